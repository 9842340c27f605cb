print("mutual")
