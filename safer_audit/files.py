"""Writing files safely: never a half-written output, never over an input."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable, Iterable

from .errors import ConfigError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # also catches hard links and symlinks
    except OSError:
        return a.resolve() == b.resolve()


def refuse_inputs(path: str | Path, protect: Iterable[str | Path]) -> None:
    """Raise ValueError if ``path`` is one of the input files in ``protect``."""
    for input_path in protect:
        if _same_file(Path(path), Path(input_path)):
            raise ConfigError(f"{path}: refusing to write over an input file")


def write_atomic(
    path: str | Path,
    content: bytes | str | Callable[[Path], None],
    protect: Iterable[str | Path] = (),
) -> Path:
    """Write ``content`` (text, bytes, or a function writing to the path it is given) to a
    temporary file next to ``path``, flush it to disk, then rename it over ``path``.

    A reader never sees a half-written file and a failure leaves ``path`` as it was.
    """
    path = Path(path)
    refuse_inputs(path, protect)
    if not path.parent.is_dir():  # say so plainly, rather than name the temporary file
        raise FileNotFoundError(f"{path}: the directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        # O_EXCL: never follow or reuse someone else's file; 0o666 lets the umask decide.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as out:
            if not callable(content):
                out.write(content.encode("utf-8") if isinstance(content, str) else content)
        if callable(content):
            content(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
