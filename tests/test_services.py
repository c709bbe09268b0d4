"""Stories about the local services that tests and `sdfarm up` start."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import redis

from producer.local import LocalFarm
from producer.processes import ManagedProcess
from producer.services import RedisService, S3Service, start_redis, start_seaweedfs
from shared.errors import ServiceStartError


def test_redis_restart_keeps_what_was_written_before_it(
    redis_service: RedisService, redis_url: str
) -> None:
    # Given a job record written to the session Redis (AOF on)
    redis.Redis.from_url(redis_url).hset("job:1", mapping={"state": "queued"})

    # When Redis is stopped and started again on the same port and directory
    redis_service.restart()

    # Then the record is still there, read back from the append-only file
    assert redis.Redis.from_url(redis_url).hgetall("job:1") == {b"state": b"queued"}


def test_two_redis_services_side_by_side_get_different_ports(
    redis_server_bin: str, tmp_path: Path
) -> None:
    # Given two Redis services started in their own directories
    first, second = start_redis(tmp_path / "a"), start_redis(tmp_path / "b")
    try:
        # Then each answers on its own port, and a key written to one is not in the other
        assert first.port != second.port
        redis.Redis.from_url(first.url).set("owner", "first")
        assert redis.Redis.from_url(second.url).get("owner") is None
    finally:
        first.stop()
        second.stop()


def test_object_put_in_the_store_reads_back_and_through_a_presigned_url(
    s3_service: S3Service,
) -> None:
    # Given a PNG-sized object put into the bucket
    client = s3_service.client()
    body = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16
    key = "images/batch-1/job-1.png"
    client.put_object(Bucket=s3_service.bucket, Key=key, Body=body, ContentType="image/png")

    # When it is read back with the SDK and through a presigned URL
    read = client.get_object(Bucket=s3_service.bucket, Key=key)["Body"].read()
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": s3_service.bucket, "Key": key}, ExpiresIn=60
    )
    fetched = httpx.get(url, timeout=10)

    # Then both give the same bytes, and the plain URL without a signature is refused
    assert read == body
    assert fetched.status_code == 200
    assert fetched.content == body
    assert httpx.get(f"{s3_service.endpoint_url}/{s3_service.bucket}/{key}").status_code == 403


def test_a_second_s3_store_runs_beside_the_first_without_a_clash(
    s3_service: S3Service, tmp_path: Path
) -> None:
    # Given the session store, and a second one started beside it
    other = start_seaweedfs(
        tmp_path, access_key="otherkey1", secret_key="othersecret1", bucket="other-bucket"
    )
    try:
        # Then no port is shared, and each store keeps its own objects
        assert not {other.port, *other.internal_ports.values()} & {
            s3_service.port,
            *s3_service.internal_ports.values(),
        }
        other.client().put_object(Bucket="other-bucket", Key="only-here", Body=b"x")
        assert (
            other.client().get_object(Bucket="other-bucket", Key="only-here")["Body"].read() == b"x"
        )
        assert "other-bucket" not in {
            b["Name"] for b in s3_service.client().list_buckets()["Buckets"]
        }
    finally:
        other.stop()


def test_a_service_that_dies_at_start_reports_the_end_of_its_log(tmp_path: Path) -> None:
    # Given a command that prints a reason and exits before it is ever ready
    script = "import sys; print('port already in use', flush=True); sys.exit(3)"
    argv = [sys.executable, "-c", script]
    process = ManagedProcess("doomed", argv, log_dir=tmp_path, ready=lambda: False)

    # When we wait for it to become ready
    with process, pytest.raises(ServiceStartError) as raised:
        process.wait_ready(timeout_s=10)

    # Then the error says it exited, with its status and the last lines of its log
    assert "exited with status 3" in str(raised.value)
    assert "port already in use" in str(raised.value)


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    # Given a process that ignores SIGTERM (and says so by creating a file)
    ignoring = tmp_path / "ignoring"
    script = (
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ignoring)!r}).touch(); time.sleep(60)"
    )
    argv = [sys.executable, "-c", script]
    process = ManagedProcess("stubborn", argv, log_dir=tmp_path, ready=ignoring.exists).start()
    process.wait_ready(timeout_s=10)

    # When it is stopped with a short grace period
    status = process.stop(timeout_s=0.5)

    # Then it was killed, and nothing is left running
    assert status == -9
    assert not process.is_running()


def test_a_local_farm_serves_the_api_and_leaves_an_env_file_to_source(
    redis_server_bin: str, tmp_path: Path
) -> None:
    # Given a local farm with file storage and no workers (the model is never loaded)
    farm = LocalFarm(state_dir=tmp_path, workers=0, models={"m": "unused"}, storage="file")

    # When it is started
    with farm:
        # Then the API answers with the generated key, and the env file says how to reach it
        health = httpx.get(f"{farm.api_url}/healthz", timeout=10)
        env_file = (tmp_path / "env").read_text()
        children = [farm.redis.process, farm.api]
        assert health.status_code == 200
        assert f"export SDFARM_API_URL={farm.api_url}\n" in env_file
        assert f"export SDFARM_API_KEY={farm.api_key}\n" in env_file
        assert f"export SDFARM_STORAGE_URL=file://{tmp_path / 'images'}\n" in env_file
        assert farm.dead_processes() == []

    # And once stopped, nothing it started is still running, and the env file is gone
    assert not any(process.is_running() for process in children)
    assert not farm.env_file.exists()
