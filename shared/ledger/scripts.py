"""The ledger's Lua scripts (`lua/*.lua`). Each runs atomically in Redis, so counters can never
drift.

The scripts never spell a key name: each starts with a table `K` of key functions generated from
`shared.keys.Keys` (`K.job(id)` is `Keys.job`), and the priority constants are filled in from
`shared.jobs` and `shared.ledger.pending`, so a key or a constant changed in Python changes here
too. The prefix is always ARGV[1]; the farm targets a single Redis (not Redis Cluster), where
building key names inside a script is allowed.

Time is Redis's: `now()` reads `TIME`, so leases, batching waits and arrival times are judged by
one clock, whatever the clocks of the hosts that call the scripts say.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from string import Template

from shared.jobs import DEFAULT_PRIORITY, MAX_PRIORITY
from shared.keys import Keys
from shared.ledger.pending import PRIORITY_CLASS
from shared.ledger.records import DEFAULT_TENANT

__all__ = [
    "COMMIT_JOBS",
    "RECORD_OUTCOME",
    "RENEW_LEASES",
    "RETRY_JOBS",
    "SUBMIT_RATE",
    "TAKE_CHUNK",
    "TRANSITION",
    "lua_keys",
]

# The Keys methods the scripts use.
_LUA_KEYS = (
    "job",
    "batch",
    "batch_jobs",
    "pending_jobs",
    "pending",
    "batch_pending",
    "turns",
    "tenant_turns",
    "batch_turns",
    "tenant_pending",
    "tenant_pass",
    "fair_clock",
    "tenant_open",
    "pending_since",
    "pending_models",
    "sequence",
    "inflight",
    "leases",
    "wake",
    "finished",
    "active_batches",
    "done_bucket",
    "stats",
    "submit_rate",
)
_MARK = "\x00"
_LITERAL = re.compile(r"^[A-Za-z0-9:_\-]*$")


def lua_keys() -> str:
    """Lua functions `K.name(args)` that build exactly the names `Keys.name(args)` builds."""
    probe = Keys(prefix=f"{_MARK}p{_MARK}")
    lines = ["local K = {}"]
    for name in _LUA_KEYS:
        params = list(inspect.signature(getattr(Keys, name)).parameters)[1:]
        text = getattr(probe, name)(*(f"{_MARK}{param}{_MARK}" for param in params))
        pieces = text.split(_MARK)  # literal, variable, literal, variable, ..., literal
        parts = []
        for index, piece in enumerate(pieces):
            if index % 2:
                parts.append(piece)
            elif piece:
                if not _LITERAL.match(piece):
                    raise ValueError(f"key {name} has a character Lua would need quoted: {piece!r}")
                parts.append(f"'{piece}'")
        lines.append(f"function K.{name}({', '.join(params)}) return {' .. '.join(parts)} end")
    return "\n".join(lines) + "\n"


_HEADER = (
    "local p = ARGV[1]\n"
    + lua_keys()
    + r"""
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function wake()
  redis.call('LPUSH', K.wake(), '1')
  redis.call('LTRIM', K.wake(), 0, 0)
end
"""
)


def _script(body: str) -> str:
    return _HEADER + Template(body).substitute(
        PRIORITY_CLASS=PRIORITY_CLASS,
        MAX_PRIORITY=MAX_PRIORITY,
        DEFAULT_PRIORITY=DEFAULT_PRIORITY,
        DEFAULT_TENANT=DEFAULT_TENANT,
    )


_LUA = Path(__file__).parent / "lua"


def _load(name: str, *uses: str) -> str:
    """The script in `lua/{name}.lua`, after the header and the shared functions it `uses`
    (`join_tenant` where it adds pending work, `push_pending` where it re-queues)."""
    parts = [(_LUA / f"{part}.lua").read_text() for part in (*uses, name)]
    return _script("".join(parts))


# Each script's arguments and return value are described at the top of its file.
TRANSITION = _load("transition", "join_tenant", "push_pending")
TAKE_CHUNK = _load("take_chunk", "join_tenant")
RENEW_LEASES = _load("renew_leases")
RETRY_JOBS = _load("retry_jobs", "join_tenant", "push_pending")
RECORD_OUTCOME = _load("record_outcome")
SUBMIT_RATE = _load("submit_rate")
COMMIT_JOBS = _load("commit_jobs", "join_tenant")
