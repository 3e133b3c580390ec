"""Hashing, in one place: sha256 of a file or of text, and the one length a short digest is cut to."""

from __future__ import annotations

import hashlib
import os

# Hex digits of a short digest (a pair's content, an SAE or heads file, a cache key): 128 bits,
# so no one can make two pairs or files with the same digest (64 bits can be collided on purpose).
DIGEST_LENGTH = 32
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """The full sha256 (hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    """The full sha256 (hex) of text as UTF-8; lone surrogates (from a JSON file) are kept, not refused."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def short_digest(full_hex: str) -> str:
    """A full hex digest cut to DIGEST_LENGTH."""
    return full_hex[:DIGEST_LENGTH]


def is_short_digest(value: object) -> bool:
    """Whether ``value`` has the form short_digest gives: DIGEST_LENGTH lowercase hex digits."""
    return isinstance(value, str) and len(value) == DIGEST_LENGTH and set(value) <= set("0123456789abcdef")
