"""safer-audit: find flipped and noisy pairs in preference data (the SAFER method)."""

__version__ = "0.1.0"
