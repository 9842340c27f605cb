enum _PlaceholderMutualAuthority {}
