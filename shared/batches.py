"""A batch submission's shape: its jobs (or prompts with defaults), priority and callback URL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from shared.callback_urls import IPNetwork, host_address, parse_callback_url, redact, refusal
from shared.errors import InvalidJob
from shared.infotext import job_from_infotext
from shared.jobs import DEFAULT_PRIORITY, MAX_PRIORITY

__all__ = ["MAX_CALLBACK_URL_CHARS", "BatchCreate", "CallbackUrl", "check_callback_url"]

MAX_CALLBACK_URL_CHARS = 2000


def _parsed(url: str) -> str:
    parse_callback_url(url)  # its ValueError says what to fix; pydantic makes it a 422
    return url


# A batch's callback URL: the one rule, for a JSON body's field and an NDJSON submission's query.
# Parsed by shared.callback_urls: http(s), a host, no user-info.
CallbackUrl = Annotated[
    str, StringConstraints(max_length=MAX_CALLBACK_URL_CHARS), AfterValidator(_parsed)
]
_CALLBACK_URL: TypeAdapter[str] = TypeAdapter(CallbackUrl)


def check_callback_url(url: str, allow_networks: Sequence[IPNetwork] = ()) -> str:
    """`url` if it is a `CallbackUrl` the farm may post to; else InvalidJob saying why.

    A host written as an IP address is checked against the farm's rule here (`refusal`); a name
    is resolved and checked when the webhook is sent, against the address it then resolves to.
    """
    try:
        url = _CALLBACK_URL.validate_python(url)
    except ValidationError as e:
        reason = e.errors()[0]["msg"].removeprefix("Value error, ")
        raise InvalidJob(
            f"`callback_url` must be an http(s) URL of at most {MAX_CALLBACK_URL_CHARS} "
            f"characters with a host and no user-info: {reason}",
            [{"field": "callback_url", "message": reason}],
        ) from e
    host = parse_callback_url(url).host
    address = host_address(host)
    if host == "localhost" or host.endswith(".localhost"):
        address = host_address("127.0.0.1")
    why = refusal(address, allow_networks) if address is not None else None
    if why is not None:
        raise InvalidJob(
            f"`callback_url` {redact(url)} points at a {why} address; the farm posts webhooks "
            "only to public addresses unless SDFARM_WEBHOOK_ALLOW_NETWORKS holds the network",
            [{"field": "callback_url", "message": f"a {why} address is not allowed"}],
        )
    return url


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
