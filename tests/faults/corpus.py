"""The bad-input corpus: malformed requests that the API must refuse at the door.

Each case is one request. The promise for every one: a 4xx answer (never a 5xx), a JSON body
whose `error` says what is wrong (naming the field or the limit where there is one), no stack
trace, nothing enqueued, and the server still serving the next request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

MISSING_JOB = "b0123456789abcdef0123-0"  # well formed, never submitted
MISSING_BATCH = "b0123456789abcdef0123"


@dataclass(frozen=True)
class Case:
    """One malformed request and words its refusal must contain (case-insensitive)."""

    name: str
    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = "application/json"
    expect: tuple[str, ...] = ()  # each must appear in the `error` text (any of `|`-split parts)
    params: dict[str, str] = field(default_factory=dict)
    auth: bool = True


def _batch(body: Any, name: str, *expect: str) -> Case:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Case(name, "POST", "/v1/batches", data, expect=expect)


def _job(name: str, *expect: str, **fields: Any) -> Case:
    return _batch({"jobs": [{"prompt": "a red fox", **fields}]}, name, *expect)


def cases() -> list[Case]:
    """At least 40 malformed requests, grouped as issue 5 lists them."""
    return [
        # broken JSON and NDJSON, wrong content type, oversized bodies
        _batch(b'{"prompts": ["a cat"', "truncated JSON", "json"),
        _batch(b"", "empty body", "body|json|required|missing"),
        _batch(b"[1, 2, 3]", "a JSON array instead of an object", "object|dict|jobs"),
        _batch(b'"just a string"', "a JSON string instead of an object", "object|dict|jobs"),
        _batch(b"null", "JSON null", "object|dict|jobs|body"),
        _batch(b'{"prompts": ["a"]} trailing', "JSON with trailing garbage", "json"),
        _batch(b'{"prompt": "a"}\n{"prompt": "b"}\n', "NDJSON sent as JSON", "json"),
        Case(
            "broken NDJSON line",
            "POST",
            "/v1/batches",
            b'{"prompt": "a"}\n{"prompt": "b"\n',
            content_type="application/x-ndjson",
            expect=("line 2|json",),
        ),
        Case(
            "NDJSON line that is not an object",
            "POST",
            "/v1/batches",
            b'{"prompt": "a"}\n[1, 2]\n',
            content_type="application/x-ndjson",
            expect=("object|line 2|job 1",),
        ),
        Case(
            "plain text content type",
            "POST",
            "/v1/batches",
            b"a cat\na dog\n",
            content_type="text/plain",
            expect=("content type|content-type|json",),
        ),
        Case(
            "a form-encoded body",
            "POST",
            "/v1/batches",
            b"prompts=a+cat",
            content_type="application/x-www-form-urlencoded",
            expect=("content type|content-type|json",),
        ),
        _batch(b'{"prompts": ["\xff\xfe a cat"]}', "invalid UTF-8", "utf-8|utf8|decode|json"),
        _batch(
            b'{"prompts": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
            "JSON nested 5000 deep",
            "json|nest|deep|string|prompt",
        ),
        # missing fields, wrong types
        _batch({}, "neither jobs nor prompts", "jobs|prompts"),
        _batch({"jobs": [{"prompt": "a"}], "prompts": ["b"]}, "both jobs and prompts", "one of"),
        _batch({"jobs": "a cat"}, "jobs as a string", "jobs"),
        _batch({"jobs": [42]}, "a job that is a number", "object|dict"),
        _batch({"jobs": [{}]}, "a job without a prompt", "prompt"),
        _batch({"jobs": []}, "no jobs at all", "no jobs|empty|at least"),
        _batch({"prompts": [None]}, "a null prompt", "prompt|string|str"),
        _batch({"prompts": [1, 2]}, "prompts that are numbers", "prompt|string|str"),
        _batch({"prompts": ["a"], "defaults": {"prompt": "b"}}, "a prompt in defaults", "prompt"),
        _batch({"prompts": ["a"], "shape": "round"}, "an unknown top-level field", "shape"),
        _job("an unknown job field", "sampler_name", sampler_name="Euler a"),
        _job("an empty prompt", "prompt", prompt=""),
        _job("a blank prompt", "prompt", prompt="   \n\t "),
        _job("a 1 MB prompt", "prompt", prompt="a" * 1_000_000),
        _job("a 1 MB negative prompt", "negative_prompt", negative_prompt="b" * 1_000_000),
        _job("steps as a string", "steps", steps="30"),
        _job("steps as a float", "steps", steps=30.5),
        _job("steps as a boolean", "steps", steps=True),
        _job("guidance as a string", "guidance", guidance="high"),
        _job("guidance as a boolean", "guidance", guidance=False),
        _job("seed as a float", "seed", seed=1e100),
        _job("width as a list", "width", width=[512]),
        # out of range and non-finite numbers
        _job("steps 0", "steps", steps=0),
        _job("steps 100000", "steps", steps=100_000),
        _job("width 10000", "width", width=10_000),
        _job("width not a multiple of 8", "width", width=100),
        _job("width below the minimum", "width", width=8),
        _job("height negative", "height", height=-512),
        _job("guidance negative", "guidance", guidance=-1),
        _job("guidance 1000", "guidance", guidance=1000),
        _batch(
            b'{"jobs": [{"prompt": "a", "guidance": NaN}]}', "guidance NaN", "guidance|nan|json"
        ),
        _batch(
            b'{"jobs": [{"prompt": "a", "guidance": Infinity}]}',
            "guidance Infinity",
            "guidance|inf|json",
        ),
        _batch(b'{"jobs": [{"prompt": "a", "guidance": 1e999}]}', "guidance 1e999", "guidance"),
        _job("seed negative", "seed", seed=-1),
        _job("seed 2**32", "seed", seed=2**32),
        _batch(
            b'{"jobs": [{"prompt": "a", "steps": 1' + b"0" * 400 + b"}]}",
            "a 400-digit integer",
            "steps|number|json|integer",
        ),
        # unknown model or sampler
        _job("an unknown model", "model", model="no-such-model"),
        _job("a model name that is a path", "model", model="../../etc/passwd"),
        _job("an unknown sampler", "scheduler", scheduler="no_such_sampler"),
        # ids that do not exist or are path tricks
        Case("an unknown job", "GET", f"/v1/jobs/{MISSING_JOB}", None, None, ("no job",)),
        Case("an unknown batch", "GET", f"/v1/batches/{MISSING_BATCH}", None, None, ("batch",)),
        Case("cancel an unknown job", "DELETE", f"/v1/jobs/{MISSING_JOB}", None, None, ("job",)),
        Case("image of an unknown job", "GET", f"/v1/jobs/{MISSING_JOB}/image", None, None),
        Case("a job id with a path trick", "GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd", None, None),
        Case("a job id with dots", "GET", "/v1/jobs/../../etc/passwd", None, None),
        Case("a batch id with a null byte", "GET", "/v1/batches/b%00", None, None, ("batch",)),
        Case("a batch id of 10000 chars", "GET", "/v1/batches/" + "b" * 10_000, None, None),
        Case(
            "a job listing with a negative cursor",
            "GET",
            f"/v1/batches/{MISSING_BATCH}/jobs",
            None,
            None,
            ("cursor|batch",),
            params={"cursor": "-1"},
        ),
        Case(
            "a job listing with an unknown state",
            "GET",
            f"/v1/batches/{MISSING_BATCH}/jobs",
            None,
            None,
            ("state|batch",),
            params={"state": "exploded"},
        ),
        # keys: none, and in the query string
        Case("no API key", "GET", f"/v1/jobs/{MISSING_JOB}", None, None, ("key",), auth=False),
        Case(
            "an API key in the query string",
            "GET",
            f"/v1/jobs/{MISSING_JOB}",
            None,
            None,
            ("key",),
            params={"api_key": "KEY"},
            auth=False,
        ),
    ]


@dataclass(frozen=True)
class Answer:
    case: Case
    status: int
    text: str

    def problems(self) -> list[str]:
        """What is wrong with this answer; empty when the refusal is a good one."""
        out = []
        if not 400 <= self.status < 500:
            out.append(f"status {self.status}, not 4xx")
        if "Traceback" in self.text or 'File "' in self.text:
            out.append("a stack trace reached the client")
        try:
            body = json.loads(self.text)
            error = str(body.get("error") or body.get("detail") or "")
        except (ValueError, AttributeError):
            out.append(f"the answer is not a JSON object: {self.text[:80]!r}")
            return out
        if not error:
            out.append(f"no `error` message in {self.text[:120]!r}")
        for words in self.case.expect:
            if not any(word.lower() in error.lower() for word in words.split("|")):
                out.append(f"the error does not mention {words!r}: {error[:160]!r}")
        return out


def send_all(api_url: str, api_key: str) -> Iterator[Answer]:
    """Send every case, then check the server still answers; yields one Answer per case."""
    with httpx.Client(base_url=api_url, timeout=60) as http:
        for case in cases():
            headers = {"Authorization": f"Bearer {api_key}"} if case.auth else {}
            if case.content_type:
                headers["Content-Type"] = case.content_type
            params = {k: (api_key if v == "KEY" else v) for k, v in case.params.items()}
            response = http.request(
                case.method, case.path, content=case.body, headers=headers, params=params
            )
            yield Answer(case, response.status_code, response.text)
            health = http.get("/healthz")
            if health.status_code != 200:
                raise AssertionError(f"after {case.name!r} /healthz answered {health.status_code}")
