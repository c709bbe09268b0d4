"""The Kubernetes manifests (deploy/k8s), read as data: every file is in the kustomization and
builds, each container on the project's images runs a real `sdfarm` command, each environment
variable is a real setting, each probe a real route, workers get a GPU and drain within their
grace period, Redis keeps the ledger, and KEDA scales each model's own workers.

What the manifests and the Grafana dashboard ask of /metrics is checked in test_deploy_metrics.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.api import create_app
from producer.cli import _parser, command_names
from shared.config import Settings
from tests.conftest import _running_in_ci

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# The variables boto3 reads itself (credentials and region); every other one is a Setting.
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEYS?$|ADMIN_KEYS|ACCESS_KEY|REDIS_URL")


def documents() -> list[dict[str, Any]]:
    """Every object of every manifest the kustomization lists."""
    found = []
    for name in kustomization()["resources"]:
        found += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return found


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents() if doc["kind"] == kind}


def ours(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The containers of a workload that run the project's images (sdfarm-api, sdfarm-worker)."""
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        if str(container["image"]).startswith("sdfarm-"):
            yield container


def project_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, deployment in of_kind("Deployment").items():
        for container in ours(deployment):
            yield name, container


def env_names(container: dict[str, Any]) -> dict[str, str | None]:
    """The container's variables: its `env` (value, or None from a Secret) and the ConfigMaps'."""
    names: dict[str, str | None] = {}
    configs = of_kind("ConfigMap")
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{container['name']}: envFrom only from a ConfigMap"
        names.update(configs[source["configMapRef"]["name"]]["data"])
    for entry in container.get("env", []):
        names[entry["name"]] = entry.get("value")
    return names


def example_secrets() -> dict[str, str]:
    lines = (K8S / "secrets.env.example").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    return {key: value for key, value in pairs}


def workers() -> dict[str, dict[str, Any]]:
    return {
        name: d
        for name, d in of_kind("Deployment").items()
        if any(c["command"][:2] == ["sdfarm", "worker"] for c in ours(d))
    }


def test_every_manifest_parses_and_is_in_the_kustomization() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = {doc["kind"] for doc in documents()}
    assert {"Deployment", "Service", "StatefulSet", "ConfigMap", "ScaledObject"} <= kinds


def test_kustomize_builds_the_whole_farm(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl") or shutil.which("kustomize")
    if kubectl is None:
        if _running_in_ci():
            pytest.fail("neither kubectl nor kustomize is installed (CI is set)")
        pytest.skip("neither kubectl nor kustomize is installed")
    # Given the manifests with secrets.env made from the example
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    shutil.copy(tree / "secrets.env.example", tree / "secrets.env")
    # When kustomize builds them
    built = subprocess.run(
        [kubectl, "kustomize", str(tree)] if kubectl.endswith("kubectl") else [kubectl, "build"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tree,
    )
    # Then every object lands in the sdfarm namespace, the Secret holds the example's keys, and
    # the images point at the registry the kustomization names
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert all(
        o["metadata"].get("namespace") == "sdfarm" for o in objects if o["kind"] != "Namespace"
    )
    secret = next(o for o in objects if o["kind"] == "Secret")
    assert set(secret["data"]) == set(example_secrets())
    images = {c["image"] for o in objects if o["kind"] == "Deployment" for c in ours_built(o)}
    assert images == {
        "registry.example.com/sdfarm-api:0.1.0",
        "registry.example.com/sdfarm-worker:0.1.0",
    }


def ours_built(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return [c for c in containers if "/sdfarm-" in c["image"]]


def test_each_container_on_the_project_images_runs_a_real_sdfarm_command() -> None:
    from worker.cli import _worker_parser  # the worker's own options (it imports no torch)

    known = command_names()
    seen = set()
    for name, container in project_containers():
        command = container["command"]
        assert command[0] == "sdfarm" and command[1] in known, f"{name}: {command}"
        seen.add(command[1])
        # And its options are ones that command takes (argparse exits on an unknown one)
        if command[1] == "worker":
            _worker_parser().parse_args(command[2:])
        else:
            _parser().parse_args(command[1:])
    assert seen == {"api", "worker"}


def test_each_environment_variable_is_a_real_setting_with_a_valid_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings_vars = {f"SDFARM_{field.upper()}" for field in Settings.model_fields}
    for name, container in project_containers():
        variables = env_names(container)
        for variable in variables:
            assert variable in settings_vars | AWS_VARIABLES, f"{name}: {variable} is no setting"
        # And the values the manifests give parse as Settings (secrets: the example's)
        for variable, value in variables.items():
            monkeypatch.setenv(
                variable, value if value is not None else example_secrets()[variable]
            )
        Settings()


def test_secrets_come_only_from_the_secret_and_the_example_names_them_all() -> None:
    secrets = example_secrets()
    referenced = set()
    for doc in documents():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            for entry in container.get("env", []):
                if SECRET_NAME.search(entry["name"]):
                    assert "value" not in entry, f"{entry['name']} is a literal"
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "sdfarm-secrets"
                    referenced.add(ref["key"])
    for config in of_kind("ConfigMap").values():
        assert not any(SECRET_NAME.search(key) for key in config["data"]), config["data"]
    assert referenced <= set(secrets), referenced - set(secrets)
    assert not (K8S / "secrets.env").exists() or "secrets.env" in (ROOT / ".gitignore").read_text()


def test_each_probe_is_a_real_route_on_a_real_port() -> None:
    app = create_app(Settings(api_keys=["k" * 32]), run_dispatcher=False, run_background=False)
    get_routes = {r.path for r in app.routes if "GET" in getattr(r, "methods", set())}
    probes = 0
    for name, container in project_containers():
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(kind, {}).get("httpGet")
            if probe is None:
                continue
            probes += 1
            assert probe["path"] in get_routes, f"{name}: {kind} {probe['path']} is no route"
            port = ports.get(probe["port"], probe["port"])
            command = container["command"]
            assert str(port) == command[command.index("--port") + 1], f"{name}: {kind} port"
    assert probes >= 2


def test_the_api_runs_several_replicas_behind_a_service() -> None:
    api = of_kind("Deployment")["sdfarm-api"]
    assert api["spec"]["replicas"] >= 2
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    service = of_kind("Service")["sdfarm-api"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    named = {p["name"] for c in ours(api) for p in c["ports"]}
    assert all(p["targetPort"] in named for p in service["spec"]["ports"])


def test_each_worker_takes_one_gpu_and_drains_within_its_grace_period() -> None:
    assert workers()
    for name, deployment in workers().items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = ours(deployment)
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1", name
        # The preStop hook gives the worker Celery's warm shutdown (SIGTERM) and waits for it
        hook = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
        assert "kill -TERM 1" in hook and "kill -0 1" in hook, hook
        # The grace period covers the chunk's grace, its hand-back and the last uploads
        grace_s = float(env_names(container)["SDFARM_SHUTDOWN_GRACE_S"] or "nan")
        assert grace_s >= 30, f"{name}: a chunk gets only {grace_s} s"
        assert pod["terminationGracePeriodSeconds"] >= grace_s + 30, name


def test_redis_keeps_the_ledger_on_disk_and_never_evicts_a_key() -> None:
    redis = of_kind("StatefulSet")["sdfarm-redis"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = [str(a) for a in container["args"]]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis["spec"]["volumeClaimTemplates"], "the AOF needs a persistent volume"


def test_keda_scales_each_models_workers_on_that_models_signal_down_to_zero() -> None:
    scaled = of_kind("ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()} == set(workers())
    for name, scaler in scaled.items():
        target = workers()[scaler["spec"]["scaleTargetRef"]["name"]]
        (container,) = ours(target)
        (model,) = [
            entry.split("=")[0] for entry in str(env_names(container)["SDFARM_MODELS"]).split(",")
        ]
        assert scaler["spec"]["minReplicaCount"] == 0, name
        triggers = scaler["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"prometheus"}
        queries = [t["metadata"]["query"] for t in triggers]
        assert any("sdfarm_model_drain_seconds" in q for q in queries)
        for query in queries:
            # Every series it reads is this model's
            for selector in re.findall(r"sdfarm_\w+\{([^}]*)\}", query):
                assert selector == f'model="{model}"', f"{name}: {query}"
        # And a queued chunk counts as max_batch jobs, as producer/capacity.py counts it
        for multiplier in re.findall(
            r"(\d+) \* \(max\(sdfarm_broker_queue_depth", " ".join(queries)
        ):
            assert int(multiplier) == Settings.model_fields["max_batch"].default
