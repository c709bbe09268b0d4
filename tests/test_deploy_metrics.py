"""What the Grafana dashboard (deploy/grafana) and the KEDA scalers (deploy/k8s) ask of /metrics
exists: every metric name they query is one a real API exports, with the labels they select or
group by. A renamed metric or label fails here, not on a blank panel or a farm that never scales.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.keys import Keys
from shared.ledger.workers import publish_heartbeat
from tests.fixtures_api import Api
from tests.test_deploy import of_kind

ROOT = Path(__file__).resolve().parents[1]
METRIC = re.compile(r"\bsdfarm_[a-z0-9_]+")
SELECTOR = re.compile(r"(sdfarm_[a-z0-9_]+)\{([^}]*)\}")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\((sdfarm_[a-z0-9_]+),\s*(\w+)\)")


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and template variable of every dashboard."""
    for path in sorted((ROOT / "deploy" / "grafana").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                yield f"{path.name}: {panel['title']}", target["expr"]
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            if variable.get("type") == "query":
                yield f"{path.name}: ${variable['name']}", query["query"]


def keda_queries() -> Iterator[tuple[str, str]]:
    for name, scaler in of_kind("ScaledObject").items():
        for trigger in scaler["spec"]["triggers"]:
            yield f"ScaledObject {name}: {trigger['name']}", trigger["metadata"]["query"]


def exported(api: Api) -> dict[str, set[str]]:
    """Each sample name a real API's /metrics has, with its label names, once every family has
    a sample: a worker's heartbeat, rendered and failed jobs."""
    publish_heartbeat(
        api.ledger.redis,
        Keys(),
        "w-grafana",
        {"models": ["tiny"], "images_done": 2, "lora_loads": 1},
        ttl_s=30,
    )
    ids = api.http.post("/v1/batches", json={"prompts": ["a", "b", "c"]}).json()["job_ids"]
    api.render_as_worker(ids[0], worker="w-grafana")
    api.render_as_worker(ids[1], worker="w-grafana", fail="render failed: CUDA OOM")
    response = api.http.get("/metrics")
    assert response.status_code == 200, response.text
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def labels_used(query: str) -> Iterator[tuple[str | None, str]]:
    """(metric or None for any metric of the query, label) of each label the query names."""
    for metric, selector in SELECTOR.findall(query):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            yield metric, label
    for group in GROUPING.findall(query):
        for label in group.split(","):
            if label.strip():
                yield None, label.strip()
    yield from LABEL_VALUES.findall(query)


def test_the_dashboard_and_the_scalers_query_only_exported_metrics_and_labels(api: Api) -> None:
    labels = exported(api)
    queries = [*dashboard_queries(), *keda_queries()]
    assert len(queries) > 10
    for where, query in queries:
        names = METRIC.findall(query)
        assert names, f"{where}: {query} reads no sdfarm metric"
        for name in names:
            assert name in labels, f"{where}: {name} is not exported ({sorted(labels)})"
        known = set().union(*(labels[name] for name in names))
        for metric, label in labels_used(query):
            allowed = labels[metric] if metric else known
            assert label in allowed, f"{where}: no {metric or 'metric'} of {query} has {label!r}"


@pytest.mark.parametrize(
    "topic",
    [
        "sdfarm_jobs",
        "sdfarm_queue_depth",
        "sdfarm_model_drain_seconds",
        "sdfarm_worker_images_per_second",
        "sdfarm_render_seconds_bucket",
        "sdfarm_job_failures_total",
    ],
)
def test_the_dashboard_shows_what_the_issue_asks_for(topic: str) -> None:
    # jobs by state, queue depth and drain time per model, images/s per worker, render
    # seconds, failures by reason
    assert any(topic in query for _, query in dashboard_queries()), topic
