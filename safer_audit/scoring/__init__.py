"""The scoring stage: judges score every pair, a stack ranks them, categories name them."""
