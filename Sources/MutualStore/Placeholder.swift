enum _PlaceholderMutualStore {}
