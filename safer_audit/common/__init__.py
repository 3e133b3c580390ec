"""Small pieces every stage shares: the domain's words, safe files, digests, progress, terminal-safe text."""
