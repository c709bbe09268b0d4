"""A batch submission's shape: its jobs (or prompts with defaults), priority and callback URL."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from shared.errors import InvalidJob
from shared.infotext import job_from_infotext
from shared.jobs import DEFAULT_PRIORITY, MAX_PRIORITY

__all__ = ["MAX_CALLBACK_URL_CHARS", "BatchCreate", "CallbackUrl", "check_callback_url"]

MAX_CALLBACK_URL_CHARS = 2000
# A batch's callback URL: the one rule, for a JSON body's field and an NDJSON submission's query.
CallbackUrl = Annotated[
    str, StringConstraints(max_length=MAX_CALLBACK_URL_CHARS, pattern=r"^https?://[^\s]+$")
]
_CALLBACK_URL: TypeAdapter[str] = TypeAdapter(CallbackUrl)


def check_callback_url(url: str) -> str:
    """`url` if it is a `CallbackUrl`; else InvalidJob saying what one looks like."""
    try:
        return _CALLBACK_URL.validate_python(url)
    except ValidationError as e:
        raise InvalidJob(
            f"`callback_url` must be an http(s) URL of at most {MAX_CALLBACK_URL_CHARS} "
            f"characters, got {url[:80]!r}",
            [{"field": "callback_url", "message": "not an http(s) URL"}],
        ) from e


class BatchCreate(BaseModel):
    """A submission: full `jobs`, `prompts` that share `defaults`, or A1111 infotexts."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[dict[str, Any]] | None = None
    prompts: list[str] | None = None
    a1111: list[str] | None = Field(
        default=None,
        description="A1111 `parameters` texts (an image's infotext), each the job it describes; "
        "a setting sdfarm cannot honour is refused by name.",
    )
    defaults: dict[str, Any] = Field(default_factory=dict)
    priority: Annotated[int, Strict()] = Field(
        default=DEFAULT_PRIORITY,
        ge=0,
        le=MAX_PRIORITY,
        description="0-9; 9 is the most urgent: higher-priority work is picked first.",
    )
    callback_url: CallbackUrl | None = Field(
        default=None,
        description="POSTed the batch summary (signed, X-Sdfarm-Signature) when the batch ends.",
    )

    def job_dicts(self, model_hashes: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """The jobs of the submission; `model_hashes` (A1111 short hash -> model name) finds
        the models of `a1111` texts by their `Model hash`."""
        if [self.jobs, self.prompts, self.a1111].count(None) != 2:
            raise InvalidJob(
                "give exactly one of `jobs` (a list of job objects), `prompts` or `a1111`"
            )
        if "prompt" in self.defaults:
            raise InvalidJob("`defaults` may not hold a prompt; put prompts in `prompts`")
        if self.jobs is not None:
            return [{**self.defaults, **job} for job in self.jobs]
        if self.a1111 is not None:
            return [
                {**self.defaults, **_infotext_job(index, text, model_hashes)}
                for index, text in enumerate(self.a1111)
            ]
        assert self.prompts is not None
        return [{**self.defaults, "prompt": prompt} for prompt in self.prompts]


def _infotext_job(index: int, text: str, model_hashes: Mapping[str, str] | None) -> dict[str, Any]:
    try:
        return job_from_infotext(text, model_hashes)
    except InvalidJob as e:
        details = [{"job": index, **problem} for problem in e.details]
        raise InvalidJob(f"job {index} (a1111[{index}]), {e}", details) from e
