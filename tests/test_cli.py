"""`sdfarm` as a user runs it: a subprocess against a real API, with the key from the environment.

Exit codes: 0 all succeeded, 1 some failed or were cancelled, 2 bad input, 3 cannot reach the farm.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from producer.processes import free_port
from shared.jobs import JobState
from shared.storage import image_key, open_storage
from tests.fixtures_api import API_KEY, Api
from tests.fixtures_farm import ROOT, FarmEnv

SMALL = ["--width", "64", "--height", "64", "--steps", "4"]


def sdfarm(
    url: str, *args: str, key: str = API_KEY, timeout_s: float = 240
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SDFARM_API_URL": url, "SDFARM_API_KEY": key, "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "producer", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout_s,
        check=False,
    )


def test_submit_wait_shows_progress_then_a_table_of_results(
    farm_env: FarmEnv,
    serve_api,
    tmp_path: Path,
) -> None:
    # Given a keyed farm with one worker, and a file of three prompts
    farm_env.start_worker()
    url = serve_api(farm_env.settings.model_copy(update={"api_keys": [API_KEY]}))
    farm_env.wait_for_workers(1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n\na lighthouse at dusk\na paper boat\n")
    # When `sdfarm submit prompts.txt --wait` runs
    done = sdfarm(url, "submit", str(prompts), *SMALL, "--seed", "7", "--wait")
    # Then it drew a progress bar, ended with a table of the three results, and exited 0
    assert done.returncode == 0, done.stderr
    assert "3/3" in done.stderr
    assert "3 jobs queued" in done.stderr
    assert "3/3 succeeded" in done.stdout
    for prompt in ("a red fox in snow", "a lighthouse at dusk", "a paper boat"):
        assert prompt in done.stdout
    assert done.stdout.count("succeeded") >= 4  # the title and one row per job
    assert done.stdout.count("s3://") == 3


def _finished_batch(api: Api, count: int) -> tuple[str, list[str]]:
    """A batch whose jobs 'rendered': real PNGs in S3, jobs succeeded in the ledger."""
    submitted = api.http.post(
        "/v1/batches", json={"prompts": [f"a tile {i}" for i in range(count)]}
    ).json()
    storage = open_storage(api.settings.storage_url, endpoint_url=api.settings.s3_endpoint_url)
    for index, job_id in enumerate(submitted["job_ids"]):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (index * 40, 90, 200)).save(buffer, format="PNG")
        data = buffer.getvalue()
        key = image_key(storage.prefix, submitted["batch_id"], job_id)
        storage.put(key, data, "image/png")
        api.ledger.force(job_id, [JobState.QUEUED], JobState.RUNNING, {"worker": "w"})
        result = {"key": key, "uri": storage.describe(key), "bytes": len(data)}
        api.ledger.force(job_id, [JobState.RUNNING], JobState.SUCCEEDED, {"result": result})
    return submitted["batch_id"], submitted["job_ids"]


def test_fetch_downloads_once_and_fetches_again_only_what_is_damaged(
    api: Api,
    tmp_path: Path,
) -> None:
    # Given a finished batch of three images, fetched once
    batch_id, job_ids = _finished_batch(api, 3)
    out = tmp_path / "out"
    first = sdfarm(api.url, "fetch", batch_id, "--out", str(out), "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["downloaded"] == 3
    originals = {p.name: p.read_bytes() for p in out.glob("*.png")}
    # When one file is cut short, one has a flipped byte, and the fetch runs again
    (out / f"{job_ids[0]}.png").write_bytes(originals[f"{job_ids[0]}.png"][:-20])
    flipped = bytearray(originals[f"{job_ids[1]}.png"])
    flipped[60] ^= 0xFF
    (out / f"{job_ids[1]}.png").write_bytes(bytes(flipped))
    again = sdfarm(api.url, "fetch", batch_id, "--out", str(out), "--json")
    # Then only the two damaged files were downloaded again, and all three are whole
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["downloaded"], report["already_intact"]) == (2, 1)
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == originals
    # And the manifest lies beside them, one line per job
    lines = (out / "manifest.ndjson").read_text().splitlines()
    assert [json.loads(line)["job_id"] for line in lines] == job_ids


def test_exit_codes_say_what_went_wrong(api: Api) -> None:
    # A refused field is bad input (2), and the message names the field and the range
    bad = sdfarm(api.url, "submit", "--prompt", "a cat", "--steps", "0")
    assert bad.returncode == 2
    assert "steps" in bad.stderr and "greater than or equal to 1" in bad.stderr
    # A wrong key is bad input too (2)
    denied = sdfarm(api.url, "batches", key="not-the-key")
    assert denied.returncode == 2
    assert "wrong API key" in denied.stderr
    # A farm that does not answer is 3
    nowhere = sdfarm(f"http://127.0.0.1:{free_port()}", "batches")
    assert nowhere.returncode == 3
    assert "cannot reach the farm" in nowhere.stderr
    # A batch that ended with cancelled jobs is 1
    submitted = sdfarm(api.url, "submit", "--prompt", "a cat", "--prompt", "a dog")
    batch_id = submitted.stdout.strip()
    assert sdfarm(api.url, "cancel", batch_id).returncode == 0
    waited = sdfarm(api.url, "wait", batch_id, "--json")
    assert waited.returncode == 1
    assert json.loads(waited.stdout)["counts"]["cancelled"] == 2


def test_every_read_command_speaks_json(api: Api, tmp_path: Path) -> None:
    batch_id, job_ids = _finished_batch(api, 2)
    for args in (
        ("status", batch_id),
        ("status", job_ids[0]),
        ("batches",),
        ("workers",),
        ("wait", batch_id),
        ("fetch", batch_id, "--out", str(tmp_path)),
    ):
        done = sdfarm(api.url, *args, "--json")
        assert done.returncode == 0, (args, done.stderr)
        json.loads(done.stdout)  # nothing but JSON on stdout
    status = json.loads(sdfarm(api.url, "status", batch_id, "--json").stdout)
    assert status["counts"]["succeeded"] == 2


def test_cancel_then_retry_queues_the_jobs_again(api: Api) -> None:
    submitted = sdfarm(api.url, "submit", "--prompt", "a kite", "--prompt", "a comet", "--json")
    batch_id = json.loads(submitted.stdout)["batch_id"]
    cancelled = json.loads(sdfarm(api.url, "cancel", batch_id, "--json").stdout)
    assert cancelled["cancelled"] == 2
    retried = sdfarm(api.url, "retry", batch_id, "--json")
    assert retried.returncode == 0
    assert json.loads(retried.stdout)["requeued"] == 2
    assert api.ledger.batch(batch_id)["counts"]["queued"] == 2


def test_a_jsonl_file_with_a_broken_line_is_refused_naming_file_and_line(
    api: Api,
    tmp_path: Path,
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat"}\n{"prompt": "a dog"\n')
    done = sdfarm(api.url, "submit", str(jobs))
    assert done.returncode == 2
    assert f"{jobs}:2: not valid JSON" in done.stderr
    assert api.ledger.redis.zcard(api.ledger.keys.batches()) == 0


def test_status_shows_counts_and_how_long_to_wait_as_a_table(api: Api) -> None:
    # Given a farm that rendered two images recently, and a batch of three waiting
    _finished_batch(api, 2)
    waiting = sdfarm(api.url, "submit", "--prompt", "a", "--prompt", "b", "--prompt", "c")
    # When its status is asked for
    done = sdfarm(api.url, "status", waiting.stdout.strip())
    # Then a table shows the counts, and a line the priority, the jobs ahead and the ETA
    assert done.returncode == 0, done.stderr
    assert "queued" in done.stdout and "succeeded" in done.stdout
    assert "priority 5, 0 jobs ahead, ETA " in done.stdout
    assert "ETA unknown" not in done.stdout  # two images were measured


def test_submit_sets_the_output_format_and_quality_of_every_job(api: Api) -> None:
    # When `sdfarm submit` asks for lossy WebP
    args = ("--prompt", "a kite", "--prompt", "a comet", "--output-format", "webp")
    done = sdfarm(api.url, "submit", *args, "--quality", "70", "--json")
    assert done.returncode == 0, done.stderr
    # Then every job of the batch has that format and quality
    for job_id in json.loads(done.stdout)["job_ids"]:
        spec = api.http.get(f"/v1/jobs/{job_id}").json()["spec"]
        assert (spec["output_format"], spec["quality"]) == ("webp", 70)
    # And a format the farm does not write is refused, naming the ones it does
    bad = sdfarm(api.url, "submit", "--prompt", "a kite", "--output-format", "gif")
    assert bad.returncode == 2 and "'png', 'webp' or 'jpeg'" in bad.stderr, bad.stderr
