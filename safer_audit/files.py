"""Writing files safely: never a half-written output, never over an input."""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import Callable, Iterable

from .errors import ConfigError


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (hard links and symlinks included); by resolved path when
    either cannot be stat'ed (a file about to be written does not exist yet)."""
    a, b = Path(a), Path(b)
    try:
        return os.path.samefile(a, b)  # also catches hard links and symlinks
    except OSError:
        return a.resolve() == b.resolve()


def refuse_inputs(path: str | Path, protect: Iterable[str | Path]) -> None:
    """Raise ValueError if ``path`` is one of the input files in ``protect``."""
    for input_path in protect:
        if same_file(path, input_path):
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
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno is None or exc.filename not in (None, str(tmp), tmp):
            raise  # not about the output (e.g. a writer's unreadable source names its own file)
        # Name the output, not the hidden temporary file (a full disk's ENOSPC names no file at all);
        # OSError(errno, ...) is the matching subclass (PermissionError, ...).
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


STALE_AFTER = 3600.0  # seconds unmodified before a temporary whose writer cannot be told is debris
_PID_MAX = 4_194_304  # Linux's highest pid: a longer run of digits is a random token, not a pid
# write_atomic's temporary names: a hex token, and the writer's pid before or after it if the name holds one.
_TEMPORARY = re.compile(r"(?:(\d{1,7})[._-])?[0-9a-f]{8,32}(?:[._-](\d{1,7}))?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | Path, stale_after: float = STALE_AFTER) -> list[Path]:
    """Delete the temporaries that killed ``write_atomic`` calls for ``path`` left next to it.

    Only names of write_atomic's own form for this ``path`` are touched. A temporary whose
    name holds a pid is stale when that process is gone; one without is stale when it has
    not been modified for ``stale_after`` seconds, so a live writer's file survives.
    Returns the files removed.
    """
    path = Path(path)
    prefix, removed = f".{path.name}.", []
    try:
        entries = list(os.scandir(path.parent))  # not glob: the name may hold [ ] * ?
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        match = _TEMPORARY.fullmatch(name[len(prefix):-len(".tmp")])
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = next((int(g) for g in match.groups() if g is not None and 0 < int(g) <= _PID_MAX), None)
        try:
            stale = not _alive(pid) if pid is not None else now - entry.stat().st_mtime > stale_after
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:  # its writer finished or another run removed it meanwhile
            continue
    return removed
