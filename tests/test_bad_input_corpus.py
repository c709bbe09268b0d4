"""Bad input, all of it refused at the door (issue 5, item 6).

The corpus (tests/faults/corpus.py) holds more than 40 malformed requests. Each must get a 4xx
that says what is wrong, with no stack trace; none may enqueue anything; the server keeps
serving. The fault suite sends the same corpus again while a batch renders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import redis

from shared.config import Settings
from shared.keys import Keys
from tests.faults.corpus import cases, send_all

KEY = "corpus-test-key-0123456789"


def test_the_corpus_holds_at_least_40_distinct_malformed_requests() -> None:
    names = [case.name for case in cases()]
    assert len(names) >= 40
    assert len(set(names)) == len(names), "two cases share a name"


def test_every_malformed_request_gets_a_4xx_that_says_what_is_wrong_and_enqueues_nothing(
    redis_url: str,
    serve_api: Callable[[Settings], str],
    tmp_path: Path,
) -> None:
    # Given the API on a real Redis, with a key and one model configured
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path / 'images'}",
        models={"tiny": str(tmp_path / "no-weights-needed")},
        api_keys=[KEY],
    )
    api_url = serve_api(settings)
    client = redis.Redis.from_url(redis_url)
    keys_before = set(client.keys("*"))

    # When every request of the corpus is sent (the server is asked /healthz after each)
    answers = list(send_all(api_url, KEY))

    # Then each was refused with a 4xx naming the problem, and no stack trace
    problems = {a.case.name: (a.status, a.problems()) for a in answers if a.problems()}
    assert not problems, "\n".join(f"{n}: {s} {p}" for n, (s, p) in problems.items())
    assert len(answers) == len(cases())

    # And nothing was written: no batch, no job, nothing pending, no Celery message
    keys = Keys()
    assert client.zcard(keys.batches()) == 0
    written = {k.decode() for k in set(client.keys("*")) - keys_before}
    assert not [k for k in written if not k.startswith(keys.dispatcher_lock())], written
    assert not client.keys("sdfarm.model.*")
