"""The ledger's records as typed values: what a job or a batch hash in Redis holds, decoded once.

Only the ledger builds these (from the raw hashes it reads); code that decides reads the typed
attributes (`record.state`, `record.attempts`). Each record is also the dict of its decoded fields
(`record["state"]`), which is what the API's JSON views and the manifest serialise as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shared.errors import UnknownId
from shared.jobs import DEFAULT_PRIORITY, JobSpec, JobState
from shared.keys import text as _s

__all__ = [
    "DEFAULT_TENANT",
    "STATES",
    "BatchRecord",
    "JobRecord",
    "decode_batch",
    "decode_job",
    "unknown_batch",
    "unknown_job",
]

STATES = [state.value for state in JobState]
# The tenant of a batch written before batches recorded one, and of a bare `KEY`.
DEFAULT_TENANT = "default"
_JSON_FIELDS = ("spec", "result", "timings", "warnings")
_INT_FIELDS = ("attempts", "seed", "step", "steps", "dispatches")


def _float(value: Any) -> float | None:
    return float(value) if value not in (None, "") else None


class JobRecord(dict[str, Any]):
    """One job as the ledger holds it: its decoded fields, with typed views of those that matter."""

    @property
    def job_id(self) -> str:
        return str(self["job_id"])

    @property
    def state(self) -> JobState:
        return JobState(self["state"])

    @property
    def batch_id(self) -> str:
        return str(self["batch_id"])

    @property
    def spec(self) -> JobSpec:
        """The validated spec; raises pydantic's ValidationError when it no longer validates."""
        return JobSpec.model_validate(self["spec"])

    @property
    def attempts(self) -> int:
        return int(self.get("attempts", 0))

    @property
    def worker(self) -> str | None:
        return self.get("worker") or None

    @property
    def cancel_requested(self) -> bool:
        return self.get("cancel_requested") == "1"

    @property
    def last_error(self) -> str | None:
        return self.get("last_error") or None

    @property
    def storage_failing_since(self) -> float | None:
        return _float(self.get("storage_failing_since"))

    @property
    def model(self) -> str:
        return str(self.get("model") or self["spec"].get("model") or "")

    @property
    def step(self) -> int:
        return int(self.get("step", 0))

    @property
    def steps(self) -> int:
        return int(self.get("steps", self["spec"]["steps"]))

    @property
    def result(self) -> dict[str, Any] | None:
        """`{"key", "uri", "bytes"}` of the stored image, once it has succeeded."""
        return self.get("result") or None

    @property
    def image_key(self) -> str | None:
        result = self.result
        return str(result["key"]) if result else None

    @property
    def timings(self) -> dict[str, float] | None:
        return self.get("timings") or None

    @property
    def model_hash(self) -> str | None:
        return self.get("model_hash") or None

    @property
    def error(self) -> str | None:
        return self.get("error") or None

    @property
    def warnings(self) -> list[str]:
        return list(self.get("warnings") or [])


class BatchRecord(dict[str, Any]):
    """One batch: its counters per state (O(1) whatever its size) and what it was submitted with."""

    @property
    def batch_id(self) -> str:
        return str(self["batch_id"])

    @property
    def total(self) -> int:
        return int(self["total"])

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self["counts"]
        return counts

    @property
    def priority(self) -> int:
        return int(self.get("priority") or DEFAULT_PRIORITY)

    @property
    def created_at(self) -> float:
        return float(self["created_at"])

    @property
    def finished_at(self) -> float | None:
        return _float(self.get("finished_at"))

    @property
    def models(self) -> frozenset[str]:
        return frozenset(m for m in str(self.get("models", "")).split(",") if m)

    @property
    def tenant(self) -> str:
        """The tenant that submitted it (DEFAULT_TENANT for a batch from before tenants)."""
        return str(self.get("tenant") or DEFAULT_TENANT)

    @property
    def callback_url(self) -> str | None:
        return self.get("callback_url") or None

    @property
    def cancelled_at(self) -> float | None:
        return _float(self.get("cancelled_at"))

    @property
    def manifest(self) -> str | None:
        return self.get("manifest") or None

    @property
    def webhook(self) -> dict[str, Any] | None:
        """The callback's delivery: state, attempts and last error, once one was scheduled."""
        if not self.get("webhook_state"):
            return None
        return {
            "state": self["webhook_state"],
            "attempts": int(self.get("webhook_attempts") or 0),
            "error": self.get("webhook_error") or None,
        }

    @property
    def remaining(self) -> int:
        """Jobs not yet in a final state."""
        return self.counts["queued"] + self.counts["running"]


def unknown_job(job_id: str) -> UnknownId:
    """The one refusal for a job id the caller cannot have: missing, expired or another
    tenant's all read the same (the API's 404 body is this message)."""
    return UnknownId(f"no job {job_id!r}")


def unknown_batch(batch_id: str) -> UnknownId:
    """The one refusal for a batch id the caller cannot have (see `unknown_job`)."""
    return UnknownId(f"no batch {batch_id!r}")


def decode_job(job_id: str, raw: Mapping[Any, Any]) -> JobRecord:
    """A job record from its raw hash (bytes or text keys and values)."""
    fields: dict[str, Any] = {_s(k): _s(v) for k, v in raw.items()}
    fields["job_id"] = job_id
    for name in _JSON_FIELDS:
        if name in fields:
            fields[name] = json.loads(fields[name])
    for name in _INT_FIELDS:
        if name in fields:
            fields[name] = int(fields[name])
    return JobRecord(fields)


def decode_batch(batch_id: str, raw: Mapping[Any, Any]) -> BatchRecord:
    """A batch record from its raw hash."""
    fields: dict[str, Any] = {_s(k): _s(v) for k, v in raw.items()}
    counts = {state: int(fields.pop(state, 0)) for state in STATES}
    total = int(fields.pop("total"))
    return BatchRecord({"batch_id": batch_id, "total": total, "counts": counts, **fields})
