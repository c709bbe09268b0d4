"""`GET /metrics`: the farm in Prometheus text format, read from Redis at each scrape.

Every number comes from the ledger or the worker heartbeats, not from this process's memory, so
any API replica answers the same and a restarted API loses nothing:

    sdfarm_jobs{state}                       jobs of unexpired batches, by state (gauge)
    sdfarm_active_batches                    batches not yet ended (gauge)
    sdfarm_queue_depth{model}                jobs waiting for dispatch, per model (gauge)
    sdfarm_broker_queue_depth{model}         chunks sent to the model's Celery queue (gauge)
    sdfarm_render_seconds                    a job's batched pass, encode to decode (histogram)
    sdfarm_jobs_finished_total{state}        succeeded / failed since the ledger began (counter)
    sdfarm_job_failures_total{reason}        failures by reason (counter)
    sdfarm_workers                           live workers (gauge)
    sdfarm_worker_images_per_second{worker}  over the last minute (gauge)
    sdfarm_worker_images_done{worker}        since the worker process started (gauge)
    sdfarm_worker_lora_loads{worker}         LoRA files loaded into a model, since start (gauge)
    sdfarm_worker_lora_hits{worker}          LoRAs a pass needed that were loaded already (gauge)
    sdfarm_worker_lora_evictions{worker}     LoRAs unloaded to stay within lora_cache_bytes (gauge)
    sdfarm_worker_lora_downloads{worker}     LoRA files downloaded from an S3 library (gauge)
    sdfarm_worker_lora_download_evictions{worker}  downloaded files deleted to stay within
                                             lora_disk_cache_bytes (gauge)
    sdfarm_worker_lora_swaps{worker}         LoRAs copied into a compiled U-Net's slots (gauge)
    sdfarm_worker_lora_slot_fallbacks{worker}  passes whose LoRAs the slots could not hold,
                                             rendered with set_adapters (gauge)
    sdfarm_worker_lora_slot_growths{worker}  slots added to more modules, one recompile each (gauge)
    sdfarm_model_workers{model}              live workers that hold the model (gauge)
    sdfarm_model_images_per_second{model}    those workers' images/s, last minute (gauge)
    sdfarm_model_drain_seconds{model}        time to render what waits at that rate; +Inf when
                                             work waits and nothing renders it (gauge)
    sdfarm_tenant_jobs{tenant,state}         jobs of unexpired batches, per tenant (gauge)
    sdfarm_tenant_jobs_submitted_total{tenant}        jobs submitted (counter)
    sdfarm_tenant_jobs_finished_total{tenant,state}   succeeded / failed (counter)
    sdfarm_tenant_render_seconds_total{tenant}        batched-pass seconds of its jobs (counter)

The tenant series show only the caller's own tenant, unless the caller is an admin (scrape with
an admin key); tenant names come from the configuration, never from requests, so they are few.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from producer.capacity import model_capacity
from shared.ledger import RENDER_BUCKETS_S, STATES
from shared.ledger.stats import TENANT_OUTCOMES

if TYPE_CHECKING:
    from producer.farm import Farm
    from producer.tenants import Caller

__all__ = ["FarmCollector", "render_metrics"]


def render_metrics(farm: Farm, caller: Caller) -> tuple[bytes, str]:
    """The text exposition (as `caller` may see it) and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(farm, caller))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class FarmCollector:
    """A prometheus_client collector that reads the farm's state when scraped."""

    def __init__(self, farm: Farm, caller: Caller) -> None:
        self.farm = farm
        self.caller = caller
        self.stats = farm.ledger.stats

    def collect(self) -> Iterator[Metric]:
        since = time.time() - self.farm.settings.status_ttl_s
        by_tenant = self.stats.job_counts_by_tenant(since)
        yield from self._jobs(by_tenant)
        yield from self._tenants(by_tenant)
        yield from self._queues()
        yield self._render_histogram()
        yield from self._outcomes()
        yield from self._workers()
        yield from self._capacity()

    def _jobs(self, by_tenant: dict[str, dict[str, int]]) -> Iterator[Metric]:
        totals: dict[str, int] = {}
        for counts in by_tenant.values():
            for state, count in counts.items():
                totals[state] = totals.get(state, 0) + count
        for state in STATES:
            totals.setdefault(state, 0)
        jobs = GaugeMetricFamily(
            "sdfarm_jobs", "Jobs of unexpired batches by state.", labels=["state"]
        )
        for state, count in totals.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily(
            "sdfarm_active_batches",
            "Batches not yet ended.",
            value=self.stats.active_batch_count(),
        )

    def _tenants(self, by_tenant: dict[str, dict[str, int]]) -> Iterator[Metric]:
        submitted = self.stats.submitted()
        finished = self.stats.tenant_outcomes()
        render_s = self.stats.tenant_render_s()
        if self.caller.admin:
            seen = set(by_tenant) | set(submitted) | set(finished) | set(render_s)
            names = sorted(seen | set(self.farm.tenants.names()))
        else:
            names = [self.caller.name]
        jobs = GaugeMetricFamily(
            "sdfarm_tenant_jobs",
            "Jobs of a tenant's unexpired batches by state.",
            labels=["tenant", "state"],
        )
        sent = CounterMetricFamily(
            "sdfarm_tenant_jobs_submitted", "Jobs a tenant submitted.", labels=["tenant"]
        )
        ended = CounterMetricFamily(
            "sdfarm_tenant_jobs_finished",
            "A tenant's jobs that ended, by final state.",
            labels=["tenant", "state"],
        )
        seconds = CounterMetricFamily(
            "sdfarm_tenant_render_seconds",
            "Seconds of batched passes spent on a tenant's succeeded jobs.",
            labels=["tenant"],
        )
        for name in names:
            for state in STATES:
                jobs.add_metric([name, state], by_tenant.get(name, {}).get(state, 0))
            sent.add_metric([name], submitted.get(name, 0))
            for state in TENANT_OUTCOMES:
                ended.add_metric([name, state], finished.get(name, {}).get(state, 0))
            seconds.add_metric([name], render_s.get(name, 0.0))
        yield from (jobs, sent, ended, seconds)

    def _queues(self) -> Iterator[Metric]:
        depths = self.farm.ledger.queue_depths()
        models = sorted(set(self.farm.settings.model_names()) | set(depths))
        queued = GaugeMetricFamily(
            "sdfarm_queue_depth", "Jobs waiting for dispatch, per model.", labels=["model"]
        )
        broker = GaugeMetricFamily(
            "sdfarm_broker_queue_depth",
            "Chunks waiting in the model's Celery queue.",
            labels=["model"],
        )
        for model, chunks in self.stats.broker_depths(models).items():
            queued.add_metric([model], depths.get(model, 0))
            broker.add_metric([model], chunks)
        yield queued
        yield broker

    def _render_histogram(self) -> Metric:
        render = self.stats.render_histogram()
        buckets, running = [], 0
        for bound in [*(str(b) for b in RENDER_BUCKETS_S), "+Inf"]:
            running += render.counts.get(bound, 0)
            buckets.append((bound, running))
        histogram = HistogramMetricFamily(
            "sdfarm_render_seconds", "Seconds of a job's batched pass (text encoder, U-Net, VAE)."
        )
        histogram.add_metric([], buckets, sum_value=render.sum_s)
        return histogram

    def _outcomes(self) -> Iterator[Metric]:
        finished = CounterMetricFamily(
            "sdfarm_jobs_finished", "Jobs that ended, by final state.", labels=["state"]
        )
        for state, count in self.stats.outcomes().items():
            finished.add_metric([state], count)
        yield finished
        failures = CounterMetricFamily(
            "sdfarm_job_failures", "Jobs that failed, by reason.", labels=["reason"]
        )
        for reason, count in self.stats.failures().items():
            failures.add_metric([reason], count)
        yield failures

    def _workers(self) -> Iterator[Metric]:
        workers = self.farm.ledger.workers.live()
        yield GaugeMetricFamily("sdfarm_workers", "Live workers.", value=len(workers))
        rate = GaugeMetricFamily(
            "sdfarm_worker_images_per_second",
            "Images a worker finished per second over the last minute.",
            labels=["worker"],
        )
        done = GaugeMetricFamily(
            "sdfarm_worker_images_done",
            "Images a worker process finished since it started.",
            labels=["worker"],
        )
        # Per-process counts, like images_done: they restart at 0 with the worker process.
        loras = {
            field: GaugeMetricFamily(
                f"sdfarm_worker_{field}",
                f"LoRA {what} in a worker process since it started.",
                labels=["worker"],
            )
            for field, what in (
                ("lora_loads", "files loaded into a model"),
                ("lora_hits", "uses that found it loaded"),
                ("lora_evictions", "unloads to stay within lora_cache_bytes"),
                ("lora_downloads", "files downloaded from an S3 library"),
                ("lora_download_evictions", "files deleted to stay within lora_disk_cache_bytes"),
                ("lora_swaps", "copies into a compiled U-Net's slots"),
                ("lora_slot_fallbacks", "passes the slots could not hold (set_adapters)"),
                ("lora_slot_growths", "slot additions to more modules (a recompile each)"),
            )
        }
        for worker in workers:
            rate.add_metric([worker["worker_id"]], self.farm.queue.worker_rate(worker["worker_id"]))
            done.add_metric([worker["worker_id"]], int(worker.get("images_done", 0)))
            for field, metric in loras.items():
                metric.add_metric([worker["worker_id"]], int(worker.get(field, 0)))
        yield rate
        yield done
        yield from loras.values()

    def _capacity(self) -> Iterator[Metric]:
        """The autoscaling signal (producer.capacity): per model, workers, rate, drain time."""
        capacity = model_capacity(
            self.farm.ledger,
            self.farm.settings.model_names(),
            max_batch=self.farm.settings.max_batch,
            worker_rate=lambda w: self.farm.queue.worker_rate(w["worker_id"]),
        )
        labels = ["model"]
        workers = GaugeMetricFamily(
            "sdfarm_model_workers", "Live workers that hold the model.", labels=labels
        )
        rate = GaugeMetricFamily(
            "sdfarm_model_images_per_second",
            "Images per second of the live workers that hold the model (last minute).",
            labels=labels,
        )
        drain = GaugeMetricFamily(
            "sdfarm_model_drain_seconds",
            "Seconds to render the model's waiting jobs at that rate (+Inf: nothing renders them).",
            labels=labels,
        )
        for c in capacity:
            workers.add_metric([c.model], c.workers)
            rate.add_metric([c.model], c.images_per_s)
            drain.add_metric([c.model], float("inf") if c.drain_s is None else c.drain_s)
        yield workers
        yield rate
        yield drain
