"""The runner: a scan's stages in order, and profiles that run them once per model."""
