"""Validation errors as the farm's `problems`: one entry per refused field, said the same way
wherever input is refused (the API's body and query, a job of a batch, `sdfarm render`).

Each problem is `{"field": "a.b" | None, "value": what was sent | None, "message": ...}`; the
message ends with what was sent, so that it reads on its own. `value` is a number as sent, or a
short text (NaN and infinities included: JSON cannot carry them back). Text that is not valid
Unicode (a lone surrogate such as `"\\ud800"`, which JSON's escapes can spell) is shown with the
surrogate written out as `\\ud800`, so the refusal can always be encoded as UTF-8.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from shared.callback_urls import redact

__all__ = ["lone_surrogate", "problems_from", "summary"]

_NO_VALUE = frozenset({"missing", "extra_forbidden"})  # no value to show: the field is the news
_SHOWN_CHARS = 60


def problems_from(
    errors: Iterable[Mapping[str, Any]], *, skip: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Pydantic's `errors()` (or FastAPI's) as problems; `skip` drops location parts ("body")."""
    out = []
    for error in errors:
        field = ".".join(str(part) for part in error["loc"] if part not in skip) or None
        field = None if field is None else _utf8(field)
        message = str(error["msg"])
        if error.get("type") == "string_unicode":
            message = "not valid Unicode text: it holds a lone surrogate (a half of a UTF-16 pair)"
        shown = None
        if error.get("type") not in _NO_VALUE:
            sent = error.get("input")
            if field is not None and field.endswith("callback_url") and isinstance(sent, str):
                sent = redact(sent)  # an answer is often logged: no user-info, no query
            shown = _shown(sent)
            message = f"{message} (got {shown!r})"
        out.append({"field": field, "value": shown, "message": _utf8(message)})
    return out


def lone_surrogate(data: Any, path: tuple[str | int, ...] = ()) -> dict[str, Any] | None:
    """The problem of the first string (or key) in parsed JSON `data` that holds a lone
    surrogate, or None: Pydantic's JSON parser refuses such a body without naming a field."""
    if isinstance(data, str):
        if _utf8(data) == data:
            return None
        field = ".".join(str(part) for part in path) or None
        shown = _shown(data)
        message = (
            "not valid Unicode text: it holds a lone surrogate (a half of a UTF-16 pair) "
            f"(got {shown!r})"
        )
        return {
            "field": None if field is None else _utf8(field),
            "value": shown,
            "message": message,
        }
    items = (
        data.items()
        if isinstance(data, dict)
        else enumerate(data)
        if isinstance(data, list)
        else ()
    )
    for key, value in items:
        found = lone_surrogate(key, (*path, key)) or lone_surrogate(value, (*path, key))
        if found is not None:
            return found
    return None


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
    text = _utf8(value if isinstance(value, str) else repr(value))
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _utf8(text: str) -> str:
    """`text` with what UTF-8 cannot encode (lone surrogates) written out as `\\udXXX`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
