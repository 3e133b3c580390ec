"""Text from a dataset, a file name or a model, made safe to show: inert, and never markup.

The one rule of the terminal view: such text reaches rich only as a ``Text`` made by
``plain`` (rich never parses it as markup or emoji codes, and its control characters are
written out as escapes), and reaches ``click.echo`` only through ``inert``.
"""

from __future__ import annotations

import json

from rich.text import Text

from ..errors import UNSAFE, inert

__all__ = ["inert", "plain", "json_text"]


def plain(text: object, style: str = "", *, multiline: bool = False) -> Text:
    """``text`` as a rich ``Text``: shown literally, with control characters escaped."""
    return Text(inert(text, multiline=multiline), style=style)


def _json_escape(match) -> str:
    code = ord(match.group())
    if code > 0xFFFF:  # JSON spells a character outside the BMP as a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def json_text(value, **kwargs) -> str:
    """``json.dumps(value, ensure_ascii=False, ...)`` whose output a terminal only displays.

    json escapes C0 controls already; C1 controls, bidi overrides and the other characters
    ``inert`` escapes are written as ``\\uXXXX`` escapes too, so the JSON means the same.
    """
    return UNSAFE.sub(_json_escape, json.dumps(value, ensure_ascii=False, **kwargs))
