"""Settings: one typed class, read at entry points and passed down (never read at import)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.callback_urls import IPNetwork, parse_networks
from shared.sentinel_addresses import parse_sentinels
from shared.speed_settings import SpeedSettings

__all__ = ["Settings", "parse_models"]


def parse_models(text: str) -> dict[str, str]:
    """Parse `name=path-or-hub-id,...` into a mapping, refusing malformed entries."""
    models: dict[str, str] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"model entry {entry!r} must look like NAME=PATH")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"model name {name!r} may only hold letters, digits, '-', '_', '.'")
        models[name] = path
    return models


class Settings(SpeedSettings, BaseSettings):
    """Every knob of the farm. Environment variables use the prefix `SDFARM_`; the worker's
    speed levers are declared in shared/speed_settings.py."""

    model_config = SettingsConfigDict(env_prefix="SDFARM_", extra="ignore")

    # Where the ledger and the Celery broker live (the same Redis).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # `s3://bucket/prefix` or `file:///absolute/dir`.
    storage_url: str = "file:///tmp/sdfarm-images"
    # Endpoint of an S3-compatible store (MinIO, SeaweedFS); None means AWS itself.
    s3_endpoint_url: str | None = None
    # The store's address as clients outside the farm's network see it, for presigned image
    # URLs (compose: the API reaches `http://minio:9000`, users reach `https://s3.example`).
    s3_public_endpoint_url: str | None = None
    # How long a presigned image URL stays valid.
    presign_expiry_s: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    # Models the farm knows: name -> diffusers directory, single-file checkpoint or hub id.
    models: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # VAEs a job may name in `vae`: name -> diffusers AutoencoderKL folder or single LDM-layout
    # file (worker/vaes.py). Every worker loads all of them, so any worker takes any job.
    vaes: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # The model a job gets when it names none (the first configured one when unset).
    default_model: str | None = None
    # Where clients find the API.
    api_url: str = "http://127.0.0.1:8000"
    # Server side: accepted API keys, comma separated, each `TENANT:KEY` or a bare `KEY` (tenant
    # `default`); producer/tenants.py parses them at API startup. No keys anywhere (here, in
    # admin_keys, in tenants_file) means no authentication: every caller is an admin.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Server side: operators' keys, the same syntax (a bare `KEY` belongs to tenant `admin`);
    # they see every tenant's batches, jobs and workers.
    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Server side: a TOML file of tenants (their keys as SHA-256 digests, never the keys; their
    # role and limits), for real deployments; see producer/tenants.py.
    tenants_file: Path | None = None
    # Client side: the key sent as `Authorization: Bearer ...`.
    api_key: str | None = None

    # Most jobs rendered together in one batched pass.
    max_batch: int = Field(default=8, ge=1, le=256)
    # Chunks kept waiting in a model's Celery queue per live worker of that model.
    queue_chunks_per_worker: int = Field(default=2, ge=1, le=64)
    # A chunk with fewer than max_batch jobs is held at most this long after its oldest job
    # arrived, so that jobs submitted close together share a GPU pass; 0 sends at once.
    batch_wait_ms: int = Field(default=50, ge=0, le=60_000)
    # Job and batch records expire this long after their last write.
    status_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    # Bytes of Redis the job ledger may fill: a batch that would take it past them is refused
    # before anything is written (413 when the batch alone is bigger, 507 while other work fills
    # the room). 0: Redis's `maxmemory` less `ledger_headroom` (no limit when that is 0 too);
    # when both are set, the smaller wins.
    ledger_max_bytes: int = Field(default=0, ge=0)
    # Share of Redis's `maxmemory` kept free of new batches, for what follows a submit (results,
    # leases, the broker's messages) and for what the estimate cannot see.
    ledger_headroom: float = Field(default=0.1, ge=0, lt=1)
    # A running job's lease; the worker renews it while it renders.
    lease_s: float = Field(default=60.0, gt=0)
    # A chunk sent to a queue but not started within this time is sent again.
    dispatch_timeout_s: float = Field(default=600.0, gt=0)
    # Attempts before a job is failed for good.
    max_attempts: int = Field(default=3, ge=1, le=100)
    # Celery's redelivery timeout; must exceed the longest chunk. The fault suite shortens it to
    # a few seconds to prove a redelivery of a chunk still rendering is harmless.
    visibility_timeout_s: int = Field(default=3600, ge=2)
    # Tries of one image upload inside the worker before its job is handed back (not failed).
    storage_put_attempts: int = Field(default=4, ge=1, le=20)
    # Pause before the second upload try; it doubles before each further one.
    storage_backoff_s: float = Field(default=0.5, ge=0)
    # A job whose image could not be stored for this long (from the first hand-back for it) fails
    # with the store's error instead of going back again: a store that refuses the workers'
    # credentials, or a bucket that is gone, must not keep jobs cycling forever. 0: never.
    storage_give_up_s: float = Field(default=3600.0, ge=0)
    # On SIGTERM the running chunk may finish within this; after it, its jobs are handed back.
    shutdown_grace_s: float = Field(default=60.0, ge=0)
    # TEST HOOK (fault suite only, off by default): a prompt holding `worker.faults.POISON_MARKER`
    # fails its render deterministically, as a poison job would.
    fault_injection: bool = False
    # TEST HOOK (fault suite only, 0 = off): passes of more rows than this raise
    # torch.cuda.OutOfMemoryError mid-loop, as a GPU that is too small would.
    simulate_oom_above_batch: int = Field(default=0, ge=0)
    # TEST HOOK (fault suite only, 0 = off): the finisher sleeps this long between storing a
    # batch's manifest and scheduling its webhook, so a test can kill an API process mid-finish.
    fault_finish_pause_s: float = Field(default=0.0, ge=0)
    # A finisher's claim on one ended batch (renewed at each step of its finish); the batch of a
    # finisher that died is handed to another API process once its claim lapses.
    finish_lease_s: float = Field(default=30.0, ge=1)
    # /healthz answers 503 when a background loop (dispatcher, finisher, webhook sender) has not
    # completed an iteration for this long; each normally completes one every second or so.
    loop_stall_s: float = Field(default=60.0, gt=0)
    # The LoRA library: a folder of `.safetensors` LoRAs, or `s3://bucket/prefix` (read with the
    # S3 settings above), each named by its file's stem (shared/lora_library.py, lora_s3.py);
    # unset: jobs may not name LoRAs. The API and every worker read it.
    lora_dir: Path | str | None = None
    # Bytes of LoRA files a worker keeps loaded as adapters of its models; the least recently
    # used are unloaded beyond it (a LoRA set in use stays, even if it alone is bigger).
    lora_cache_bytes: int = Field(default=2 * 1024**3, ge=0)
    # An S3 library is listed again when its listing is older than this (a name it lacks lists
    # it at once), so an upload is usable without a restart.
    lora_list_interval_s: float = Field(default=30.0, ge=0)
    # Where a worker keeps the LoRAs it downloaded from an S3 library (worker/lora_downloads.py);
    # unset: `sdfarm-loras` in the system's temp folder.
    lora_disk_cache_dir: Path | None = None
    # Bytes of downloaded LoRA files a worker keeps on disk, least recently used deleted first
    # beyond it; apart from lora_cache_bytes, since files cost disk and adapters memory.
    lora_disk_cache_bytes: int = Field(default=20 * 1024**3, ge=0)
    # Textual-inversion embeddings (A1111 `.pt`/`.safetensors`, diffusers' `learned_embeds`), each
    # named by its file's stem and used where a prompt names it (worker/embeddings.py); every
    # worker installs those that fit each model at start. A local folder; unset: none.
    embeddings_dir: Path | None = None
    # Progress is written at most this often per chunk.
    progress_interval_s: float = Field(default=0.25, ge=0)
    # A worker's heartbeat record lives this long unless renewed.
    worker_ttl_s: float = Field(default=15.0, gt=0)
    # Chunks whose images wait to be stored while the next chunk renders (worker/output.py):
    # one hides a chunk's PNG encoding and upload behind the next render; more only hold memory.
    output_depth: int = Field(default=1, ge=1, le=8)
    # Every image gets a WebP thumbnail this many pixels on its longest side, stored beside it
    # (`{prefix}/{batch_id}/thumbs/{job_id}.webp`), made on the output thread; 0: none.
    thumbnail_px: int = Field(default=256, ge=0, le=2048)
    # Longest accepted prompt, in characters.
    max_prompt_chars: int = Field(default=4000, ge=1)
    # Most jobs in one submitted batch.
    max_jobs_per_batch: int = Field(default=100_000, ge=1)
    # Largest init image, encoded (an upload, a base64 image, an object a worker reads).
    init_image_max_bytes: int = Field(default=12_000_000, ge=1024, le=12_000_000)
    # Most pixels (width x height) an init image's header may claim: more is refused before any
    # decoding, at the door (422) and in the worker (that job alone fails). At most 4096x4096.
    init_image_max_pixels: int = Field(default=4096 * 4096, ge=64 * 64, le=4096 * 4096)
    # s3:// folders jobs may name init images in besides the farm's own uploads
    # (`s3://bucket/inputs/,...`); any other key is refused at submit. Every tenant may read them.
    init_image_prefixes: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Largest accepted request body (JSON or NDJSON); 100,000 jobs with long prompts fit.
    max_body_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    # A request body that sends nothing for this long is cut off (408, connection closed): a
    # stalled upload must not hold anything of the API's for ever.
    body_idle_timeout_s: float = Field(default=30.0, gt=0)
    # The longest a whole request body may take to arrive (408 past it); a body that drips a
    # byte now and then stays under the idle timeout, not under this one.
    body_timeout_s: float = Field(default=600.0, gt=0)
    # Threads that validate and write submissions, apart from the pool the other routes use,
    # so a burst of big submits never leaves `/healthz` or status routes waiting for a thread.
    ingest_threads: int = Field(default=4, ge=1, le=64)
    # Redis clients (API, dispatcher, worker, CLI; shared/redis_client.py): a command whose
    # answer takes longer than this fails instead of hanging. It must exceed the longest block
    # the farm asks of Redis (the finisher's 0.5 s BLMOVE, the dispatcher's 0.25 s BLPOP).
    redis_socket_timeout_s: float = Field(default=30.0, ge=2)
    # Connecting to Redis fails after this long (an unreachable host, a dropped SYN).
    redis_connect_timeout_s: float = Field(default=5.0, gt=0)
    # A connection idle this long is PINGed before it is used again, so one that a proxy or a
    # failover dropped silently is replaced instead of failing the next command; 0: never.
    redis_health_check_interval_s: int = Field(default=30, ge=0)
    # Redis Sentinel (shared/redis_client.py): `host:port,...` of the sentinels that know where
    # the master is. Set, the ledger and the broker ask them and follow a failover, and
    # SDFARM_REDIS_URL gives only the master's password and database; unset, it is the Redis.
    redis_sentinels: Annotated[list[tuple[str, int]], NoDecode] = Field(default_factory=list)
    # The name the sentinels know the farm's master by (`sentinel monitor NAME ...`).
    redis_master: str = Field(default="mymaster", min_length=1)
    # The sentinels' own password (their `requirepass`); None when they have none.
    redis_sentinel_password: str | None = None
    # Replicas that must acknowledge a submitted batch (Redis WAIT) before the API answers it;
    # 0: answer once the master has it. See the README on what asynchronous replication loses.
    redis_wait_replicas: int = Field(default=0, ge=0, le=16)
    # How long a submit waits for those acknowledgements before it answers anyway (logged).
    redis_wait_timeout_ms: int = Field(default=1000, ge=1, le=60_000)
    # Server side: HMAC-SHA256 key that signs webhook bodies; callbacks are refused without one.
    webhook_secret: str | None = None
    # Webhook deliveries tried before giving up (the first try included).
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    # Wait before the first webhook retry; it doubles after each failure up to the cap below.
    webhook_backoff_s: float = Field(default=2.0, gt=0)
    webhook_backoff_max_s: float = Field(default=600.0, gt=0)
    # One webhook attempt, whole (resolving the host, connecting, sending, the answer's status),
    # may take this long before it counts as failed: a deadline, not a per-read timeout, so a
    # receiver that trickles bytes cannot hold a delivery longer.
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # Webhook deliveries in flight at once per API process, so a slow receiver holds only its own.
    webhook_concurrency: int = Field(default=8, ge=1, le=256)
    # Networks webhooks may be posted to although they are not public (`127.0.0.0/8,10.0.0.0/8`):
    # loopback, link-local, private, multicast and metadata addresses are refused otherwise.
    webhook_allow_networks: Annotated[list[IPNetwork], NoDecode] = Field(default_factory=list)
    # ETAs use the images finished in this recent window (per model).
    throughput_window_s: float = Field(default=300.0, ge=10)

    @field_validator("models", "vaes", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        return parse_models(value) if isinstance(value, str) else value

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _parse_sentinels(cls, value: object) -> object:
        return parse_sentinels(value) if isinstance(value, str) else value

    @field_validator("init_image_prefixes", mode="before")
    @classmethod
    def _parse_prefixes(cls, value: object) -> object:
        """Each an `s3://bucket/folder/`: a `/` is added, so `inputs` never matches `inputs2/`."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            return value
        for prefix in value:
            if not str(prefix).startswith("s3://") or not str(prefix)[5:].partition("/")[0]:
                raise ValueError(f"init_image_prefixes: {prefix!r} is not s3://bucket/folder/")
        return [str(prefix).rstrip("/") + "/" for prefix in value]

    @field_validator("webhook_allow_networks", mode="before")
    @classmethod
    def _parse_networks(cls, value: object) -> object:
        return parse_networks(value) if isinstance(value, str) else value

    @field_validator(
        "tenants_file", "lora_dir", "lora_disk_cache_dir", "embeddings_dir", mode="before"
    )
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("lora_dir", mode="after")
    @classmethod
    def _lora_dir_is_a_folder_or_s3(cls, value: Path | str | None) -> Path | str | None:
        """A folder stays a Path; `s3://bucket/prefix` a string (a Path would fold its `//`)."""
        if not isinstance(value, str):
            return value
        if value.startswith("s3://"):
            if not value.removeprefix("s3://").partition("/")[0]:
                raise ValueError(f"lora_dir {value!r} names no bucket: use s3://bucket/prefix")
            return value
        if "://" in value:
            raise ValueError(
                f"lora_dir must be a folder or s3://bucket/prefix; {value!r} is another URL"
            )
        return Path(value)

    @field_validator("embeddings_dir", mode="before")
    @classmethod
    def _embeddings_dir_is_a_folder(cls, value: object) -> object:
        if isinstance(value, str) and "://" in value:
            raise ValueError(
                f"embeddings_dir must be a folder; {value!r} is a URL, and s3:// embeddings are "
                "not read yet: sync the prefix to a folder on each worker"
            )
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        if not value.startswith(("s3://", "file://")):
            raise ValueError(f"storage_url must start with s3:// or file://, got {value!r}")
        return value

    def model_names(self) -> list[str]:
        return list(self.models)

    def resolve_default_model(self) -> str | None:
        if self.default_model:
            return self.default_model
        return next(iter(self.models), None)
