"""Validation errors as the farm's `problems`: one entry per refused field, said the same way
wherever input is refused (the API's body and query, a job of a batch, `sdfarm render`).

Each problem is `{"field": "a.b" | None, "value": what was sent | None, "message": ...}`; the
message ends with what was sent, so that it reads on its own. `value` is a number as sent, or a
short text (NaN and infinities included: JSON cannot carry them back).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["problems_from", "summary"]

_NO_VALUE = frozenset({"missing", "extra_forbidden"})  # no value to show: the field is the news
_SHOWN_CHARS = 60


def problems_from(
    errors: Iterable[Mapping[str, Any]], *, skip: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Pydantic's `errors()` (or FastAPI's) as problems; `skip` drops location parts ("body")."""
    out = []
    for error in errors:
        field = ".".join(str(part) for part in error["loc"] if part not in skip) or None
        message = str(error["msg"])
        shown = None
        if error.get("type") not in _NO_VALUE:
            shown = _shown(error.get("input"))
            message = f"{message} (got {shown!r})"
        out.append({"field": field, "value": shown, "message": message})
    return out


def summary(problems: list[dict[str, Any]]) -> str:
    """The first problem as one line, "`field`: message", for an error's text."""
    if not problems:
        return "invalid input"
    first = problems[0]
    where = f"`{first['field']}`: " if first.get("field") else ""
    return f"{where}{first['message']}"


def _shown(value: Any) -> Any:
    finite = not isinstance(value, float) or math.isfinite(value)
    if value is None or (isinstance(value, int | float | bool) and finite):
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."
