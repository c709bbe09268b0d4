"""Text from the farm made safe to print on a terminal.

A prompt, an error or a warning is whatever a submitter (or a worker) wrote, and a terminal obeys
the control sequences in what it prints: `ESC[2J` clears the screen, `ESC]0;...BEL` retitles the
window, `ESC]8;;URL` hides a link behind other text, a carriage return overwrites a line. Every
piece of such text the CLI prints goes through `printable` first, which removes escape sequences
whole and every other C0 or C1 control character, keeping only newlines and tabs.
"""

from __future__ import annotations

import re

__all__ = ["printable"]

_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, screen clears
    r"|(?:\x1b[\]P^_X]|[\x9d\x90\x9e\x9f\x98]).*?(?:\x07|\x1b\\|\x9c|$)"  # OSC, DCS, PM, APC, SOS
    r"|\x1b[ -/]*[0-~]",  # any other escape (charset switches, resets)
    re.DOTALL,
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all C0 but \t \n, DEL, all C1


def printable(text: str) -> str:
    """`text` without terminal control sequences or control characters (but \\n and \\t)."""
    return _CONTROL.sub("", _SEQUENCE.sub("", text))
