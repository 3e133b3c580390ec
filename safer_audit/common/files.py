"""Writing files safely: never a half-written output, never over an input."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ConfigError

STALE_AFTER = 24 * 3600.0  # seconds unmodified after which a temporary whose writer cannot be told is debris


_TEMP_OWNER = re.compile(r"\.(\d+)@([A-Za-z0-9_-]*)\.[0-9a-f]+\.tmp$")


# what follows ".NAME." in a temporary of write_atomic (and in the older, ownerless form)
_TEMP_TAIL = re.compile(r"(?:\d+@[A-Za-z0-9_-]*\.)?[0-9a-f]{8,32}")


def temporary_name(name: str) -> str:
    """``.NAME.PID@HOST.RANDOM.tmp``: unique per writer, and says whose it is, so only a
    dead writer's debris is ever cleaned up (is_stale_temporary)."""
    return f".{name}.{os.getpid()}@{_host_tag()}.{secrets.token_hex(6)}.tmp"


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


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def writable_target(path: str | Path) -> Path:
    """The regular file a write to ``path`` may replace, or a ConfigError saying why none.

    The outputs rule: a new path or a regular file is written (atomically, by rename); a
    symbolic link is followed and its target replaced, the link kept; a device, FIFO, socket or
    directory is refused (a rename would put a regular file where ``/dev/null`` was, and as root
    in a container that breaks the machine); so is a read-only file, which a rename would
    otherwise replace without a word. ``-`` (standard output) is the caller's to handle.
    """
    path = Path(path)
    if str(path) == "-":
        raise ConfigError("-: this output cannot be written to standard output; give a file name")
    try:
        status = path.lstat()
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write ({exc.strerror})") from None
    target = path
    if stat.S_ISLNK(status.st_mode):
        target = Path(os.path.realpath(path))
        try:
            status = target.stat()
        except FileNotFoundError:  # a dangling link: write where it points
            return target
        except OSError as exc:
            raise ConfigError(f"{path}: cannot write ({exc.strerror})") from None
    if not stat.S_ISREG(status.st_mode):
        via = "" if target == path else f" (a link to {target})"
        raise ConfigError(f"{path}: is {_kind(status.st_mode)}{via}; outputs are written to regular files only"
                          " (write - to send a report to standard output)")
    if not status.st_mode & 0o222:
        raise ConfigError(f"{path}: is read-only; make it writable or choose another output")
    return target


def read_bounded(path: str | Path, limit: int, error: Callable[[str], Exception]) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    A side input (decisions, baseline, report, features, taxonomy) is read whole, so a FIFO
    would block for ever and ``/dev/zero`` would fill memory: both are refused, as is a file
    larger than ``limit``. ``error(message)`` makes the exception to raise (the caller's kind,
    naming its file); the message says what is wrong and never names a temporary.
    """
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise wait here for ever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"cannot read ({exc.strerror})") from None
    try:
        status = os.fstat(fd)  # of what was opened, not of what the name meant a moment before
        if not stat.S_ISREG(status.st_mode):
            raise error(f"is {_kind(status.st_mode)}; give a regular file")
        if status.st_size > limit:
            raise error(f"is {status.st_size:,} bytes; the most read is {limit:,}")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # grew while being read
            raise error(f"is more than {limit:,} bytes, the most read")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)


def write_atomic(
    path: str | Path,
    content: bytes | str | Callable[[Path], None],
    protect: Iterable[str | Path] = (),
) -> Path:
    """Write ``content`` (text, bytes, or a function writing to the path it is given) to a
    temporary file next to ``path``, flush it to disk, then rename it over ``path``.

    A reader never sees a half-written file and a failure leaves ``path`` as it was.
    """
    path = writable_target(path)
    refuse_inputs(path, protect)
    if not path.parent.is_dir():  # say so plainly, rather than name the temporary file
        raise FileNotFoundError(f"{path}: the directory {path.parent} does not exist")
    tmp = path.with_name(temporary_name(path.name))
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def is_stale_temporary(path: Path, now: float | None = None) -> bool:
    """Whether a temporary file (write_atomic's naming) is debris of a dead writer.

    A temporary names its writer's pid and host: it is stale when that process is gone
    from this host, or when it has not been modified for STALE_AFTER (a writer on another
    host, or an old name without an owner). A live writer's half-written file is never touched.
    """
    try:
        age = (now or time.time()) - path.lstat().st_mtime
    except OSError:
        return False
    owner = _TEMP_OWNER.search(path.name)
    if owner and owner.group(2) == _host_tag():
        return not _process_alive(int(owner.group(1)))
    return age > STALE_AFTER


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "", socket.gethostname().split(".")[0])[:32]


def remove_stale_temporaries(directory: str | Path, name: str | None = None) -> list[Path]:
    """Delete dead writers' temporary files and directories in ``directory`` (one level).

    With ``name``, only the temporaries of that one output (``.NAME.<owner>.<token>.tmp``),
    so a directory shared with other programs loses nothing of theirs. Returns what was removed.
    """
    directory, removed = Path(directory), []
    try:
        entries = list(os.scandir(directory))  # not glob: a name may hold [ ] * ?
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        if name is not None:
            prefix = f".{name}."
            if not (entry.name.startswith(prefix) and _TEMP_TAIL.fullmatch(entry.name[len(prefix):-len(".tmp")])):
                continue
        path = Path(entry.path)
        if not is_stale_temporary(path):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class SpooledRecords:
    """Byte records appended to an unnamed temporary file (deleted when closed or collected) and read back by
    range with one ``pread``; 8 bytes a record held (where it ends). What SpooledTexts and data.PairTable keep
    out of the driver's memory."""

    def __init__(self, directory: str | Path | None = None, prefix: str = "records-"):
        import tempfile
        from array import array

        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=directory, prefix=prefix)
        self._ends = array("q")  # byte offset where each record ends in the file

    def extend(self, records: Iterable[bytes]) -> None:
        data = bytearray()
        end = self._ends[-1] if self._ends else 0
        for record in records:
            data += record
            end += len(record)
            self._ends.append(end)
        self._file.seek(0, 2)
        self._file.write(data)
        self._file.flush()

    def __len__(self) -> int:
        return len(self._ends)

    @property
    def size(self) -> int:
        """Bytes in the file."""
        return self._ends[-1] if self._ends else 0

    def read(self, start: int, stop: int) -> list[bytes]:
        """The records ``start`` .. ``stop - 1`` (in range), in one read."""
        if stop <= start:
            return []
        lo = self._ends[start - 1] if start else 0
        data = os.pread(self._file.fileno(), self._ends[stop - 1] - lo, lo)
        return [data[(self._ends[i - 1] if i else 0) - lo:self._ends[i] - lo] for i in range(start, stop)]

    def close(self) -> None:
        self._file.close()


def render_json(value, indent: int = 0) -> str:
    """JSON with sorted keys, where a dict or list of plain values takes one line.

    So a pair or a feature is one line, and a diff of two baselines shows the pairs that changed.
    """
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if children is None or not any(isinstance(v, (dict, list)) for v in children):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {render_json(value[k], indent + 1)}"
                 for k in sorted(value)]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}" + ("\n" if indent == 0 else "")
    items = [f"{inner}{render_json(v, indent + 1)}" for v in value]
    return "[\n" + ",\n".join(items) + f"\n{pad}]" + ("\n" if indent == 0 else "")
