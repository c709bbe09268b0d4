"""The production compose files, read as data: the commands they run exist, Redis keeps the
ledger, every worker gets a GPU, and no secret ships with a default."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.cli import command_names

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.workers.yml"]
# Names that hold credentials; a variable or an environment key matching one is a secret.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEYS?$|ACCESS_KEY|AUTH|REDIS_URL")
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<rest>[^}]*)\}")


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return data


def words(command: str | list[Any] | None) -> list[str]:
    """A compose `command` as words (YAML 1.1 reads a bare `yes` as True; compose does not)."""
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return ["yes" if word is True else str(word) for word in command]


def strings(node: Any) -> Iterator[str]:
    """Every string in the parsed file, keys and comments aside."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def runs_project_image(service: dict[str, Any]) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("sdfarm")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(entry.partition("=")[::2] for entry in env)
    return {key: str(value) for key, value in env.items()}


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_every_service_on_the_project_image_runs_a_real_sdfarm_command(compose_file: str) -> None:
    # Given the subcommands the real CLI offers
    known = command_names()
    services = load(compose_file)["services"]
    ours = {name: s for name, s in services.items() if runs_project_image(s)}

    # Then each service built from this project runs `sdfarm <one of them>`
    assert ours, f"{compose_file} runs nothing from the project image"
    for name, service in ours.items():
        command = words(service.get("command"))
        assert command[:1] == ["sdfarm"], f"{name}: command {command} does not start with sdfarm"
        assert command[1] in known, f"{name}: `sdfarm {command[1]}` is not one of {sorted(known)}"


def test_redis_keeps_the_ledger_on_disk_and_never_evicts_a_key() -> None:
    command = words(load("docker-compose.yml")["services"]["redis"]["command"])

    def value_of(flag: str) -> str | None:
        return command[command.index(flag) + 1] if flag in command else None

    assert value_of("--appendonly") == "yes"
    assert value_of("--maxmemory-policy") == "noeviction"


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_every_worker_reserves_an_nvidia_gpu(compose_file: str) -> None:
    services = load(compose_file)["services"]
    workers = {
        n: s for n, s in services.items() if words(s.get("command"))[:2] == ["sdfarm", "worker"]
    }
    assert workers, f"{compose_file} has no worker service"
    for name, service in workers.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(
            device.get("driver") == "nvidia"
            and "gpu" in device.get("capabilities", [])
            and (
                device.get("count", 0) == "all"
                or int(device.get("count", 0)) >= 1
                or device.get("device_ids")
            )
            for device in devices
        ), f"{name} reserves no nvidia GPU: {devices}"


def test_the_api_and_workers_start_only_once_redis_and_the_bucket_are_ready() -> None:
    services = load("docker-compose.yml")["services"]
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["minio"]["condition"] == "service_healthy", name
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
    for name in ("redis", "minio", "api"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_no_secret_has_a_literal_default(compose_file: str) -> None:
    data = load(compose_file)
    values = list(strings(data))

    # A secret variable is required (`${VAR:?message}`), never given a fallback (`${VAR:-x}`)
    for match in (m for value in values for m in INTERPOLATION.finditer(value)):
        if SECRET_NAME.search(match["name"]):
            assert match["op"] in (":?", "?"), f"{match[0]} must be required, not defaulted"

    # A secret in a service's environment comes from a variable, never a literal
    for name, service in data["services"].items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert INTERPOLATION.search(value), f"{name}: {key} is a literal"

    # And so does the password in any URL that carries one (redis://:PASSWORD@host)
    for password in (p for value in values for p in re.findall(r"://[^/@\s:]*:([^@\s]+)@", value)):
        assert password.startswith("${"), f"a URL carries a literal password: {password}"


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_scaled_worker_replicas_each_claim_a_gpu_of_their_own(compose_file: str) -> None:
    # Docker gives every `count: 1` replica the same first GPU; so a worker service that is
    # scaled sees all GPUs and claims one, and holds nothing that two replicas cannot share.
    services = load(compose_file)["services"]
    workers = {
        n: s for n, s in services.items() if words(s.get("command"))[:2] == ["sdfarm", "worker"]
    }
    for name, service in workers.items():
        command = words(service["command"])
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert command[command.index("--gpus") + 1] == "claim:1", name
        assert all(device.get("count") == "all" for device in devices), name
        assert "ports" not in service and "container_name" not in service, name
