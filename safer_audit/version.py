"""The version of safer-audit: one place, read by setup.cfg and written into reports and baselines."""

__version__ = "0.1.0"
