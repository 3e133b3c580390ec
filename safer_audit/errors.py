"""Every error a user can act on, under one base class, and how such text is shown safely.

A ``SaferAuditError`` is bad input, a bad option or a resource that cannot be used: the
command line prints its message as one line (per error) and exits 2. Anything else that
escapes a command is a bug and is shown as one, with its traceback.

Messages often quote file names, ids and field names from a dataset. ``inert`` turns such
text into something a terminal only displays: control characters (ESC, OSC, BEL, CR,
backspace, C1 controls, bidirectional overrides) are written out as escapes such as
``\\x1b``, so data can never retitle a window, clear the screen, hide text or fake output.
"""

from __future__ import annotations

import re

EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2


class SaferAuditError(Exception):
    """Bad input, options or resources: one line to the user and exit status 2."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(SaferAuditError, ValueError):
    """An option value the library refuses (layer out of range, unknown format, ...)."""


class DataError(SaferAuditError, ValueError):
    """A source or record that cannot be used: ``path:line: field "x" message``.

    ``line`` is the 1-based line of text formats, or the 1-based row (header not
    counted) of CSV, Parquet and ``datasets``; None when the whole source is at fault.
    """

    def __init__(self, path: str, line: int | None, field: str | None, message: str):
        super().__init__(path, line, field, message)
        self.path, self.line, self.field, self.message = path, line, field, message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        what = self.message if self.field is None else f'field "{self.field}" {self.message}'
        return f"{where}: {what}"


class DataErrors(DataError):
    """The first errors of a source (at most ``max_errors``); behaves as the first one."""

    def __init__(self, errors: list[DataError]):
        first = errors[0]
        super().__init__(first.path, first.line, first.field, first.message)
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)


class ModelLoadError(SaferAuditError):
    """The model could not be loaded; the message says why and what to do."""


class CacheError(SaferAuditError):
    """The cache directory cannot be used."""


class SaeFormatError(SaferAuditError, ValueError):
    """An SAE directory that cannot be read; the message is one line naming file and field."""


class FeaturesFileError(SaferAuditError, ValueError):
    """A features file that cannot be used; the message names the file and entry."""


class ScanError(SaferAuditError):
    """A scan that cannot go on; the message says why."""


class BaselineError(SaferAuditError, ValueError):
    """A baseline that cannot be used: unreadable, malformed, or made with another reference."""


class CleanError(SaferAuditError, ValueError):
    """A clean that cannot be done as asked; the message says why."""


class DecisionsError(SaferAuditError, ValueError):
    """A decisions file that cannot be used; the message is one line naming file and field."""


class UnknownPairError(SaferAuditError, KeyError):
    """A pair the user named that the data does not hold."""

    def __str__(self) -> str:
        return self.args[0]


class PluginError(SaferAuditError):
    """A plugin could not be loaded or does not fit the contract."""


# ------------------------------------------------------------------- inert text

# C0 controls but tab and newline, DEL, C1 controls, and the Unicode format characters
# that reorder or hide text (bidi embeddings/overrides/isolates, LRM/RLM/ALM, zero-width
# joiners and spaces, the BOM, interlinear annotations) -- "Trojan Source" and friends --,
# the Mongolian vowel separator, and the invisible tag characters that can carry a whole
# hidden ASCII message ("ASCII smuggling").
UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u180e\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]"
)
_UNSAFE_LINE = re.compile(UNSAFE.pattern[:-1] + "\t\n]")


def _escape(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if char == "\n":
        return "\\n"
    if char == "\t":
        return "\\t"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"  # eight digits, as Python writes it: unambiguous


def inert(text: object, *, multiline: bool = False) -> str:
    """``text`` with every control or text-reordering character written out as an escape.

    ``multiline=True`` keeps newlines and tabs (a response shown in full); otherwise they
    are escaped too, so the result is one line (ids, file names, error messages).
    """
    text = str(text)
    return (UNSAFE if multiline else _UNSAFE_LINE).sub(_escape, text)
