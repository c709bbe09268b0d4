"""Who is calling: the API keys, the tenant each belongs to, its role and its limits.

Keys come from three settings, read once when the API starts (`load_tenants`):

- `SDFARM_API_KEYS`: `TENANT:KEY` or a bare `KEY` (tenant `default`), comma separated;
- `SDFARM_ADMIN_KEYS`: operators' keys, the same syntax (a bare `KEY` belongs to tenant `admin`);
- `SDFARM_TENANTS_FILE`: for real deployments, a TOML file that holds SHA-256 digests of the keys,
  never the keys, with each tenant's role and limits:

      [tenants.alpha]
      keys_sha256 = ["9f86d081884c7d65..."]   # printf %s "$KEY" | sha256sum
      role = "tenant"                          # or "admin": sees every tenant's work
      max_queued_jobs = 50000                  # the limits below are optional
      max_jobs_per_batch = 10000
      max_priority = 7
      submits_per_minute = 60
      weight = 2.0

Only digests are kept in memory: a presented key is hashed and compared with every digest in
constant time. A tenant is defined in one place with one role. A farm with no keys at all is open
(local development): every caller is tenant `default` with admin rights, as before tenants.

Submit enforces each `Tenant`'s limits (`producer.quotas`; an admin has none), the dispatcher
shares the GPUs by `weight` (`Tenants.weights`). A tenant of SDFARM_API_KEYS or SDFARM_ADMIN_KEYS
weighs 1 with no limits: limits and weights are set in the tenants file.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.config import Settings
from shared.errors import ConfigError
from shared.jobs import MAX_PRIORITY
from shared.ledger import DEFAULT_TENANT

__all__ = [
    "ADMIN_TENANT",
    "OPEN",
    "Caller",
    "Limits",
    "Role",
    "Tenant",
    "Tenants",
    "load_tenants",
    "parse_key_entries",
]

ADMIN_TENANT = "admin"  # the tenant of a bare key in SDFARM_ADMIN_KEYS
# Tenant names end up in Redis key names and metric labels: short, plain, from configuration.
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_NAME_RULE = "1-64 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"
_KEY = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: what fits a Bearer header unquoted
_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")
_HOW_TO_DIGEST = 'printf %s "$KEY" | sha256sum'
_CLEAR_TEXT_FIELDS = frozenset({"key", "keys", "api_key", "api_keys", "secret", "token"})


class Role(enum.StrEnum):
    """What a tenant's keys may see: their own batches and jobs, or everything."""

    TENANT = "tenant"
    ADMIN = "admin"


class Limits(BaseModel):
    """A tenant's limits; None means only the farm's own settings apply.

    Submit enforces `max_queued_jobs`, `max_jobs_per_batch`, `max_priority` and
    `submits_per_minute` (`producer.quotas`: 429 (422 for a batch that alone is over it), 422,
    422 and 429). `weight` is the tenant's share in the dispatcher, admins' included. A tenant
    with the admin role is never limited.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Jobs of the tenant's not yet final (queued or running) at once.
    max_queued_jobs: int | None = Field(default=None, ge=1)
    # Jobs in one of its batches (below the farm's max_jobs_per_batch).
    max_jobs_per_batch: int | None = Field(default=None, ge=1)
    # Highest batch priority it may ask for (0-9).
    max_priority: int | None = Field(default=None, ge=0, le=MAX_PRIORITY)
    # Submissions per minute, in a fixed window (below 1: one submit every 60/rate seconds).
    submits_per_minute: float | None = Field(default=None, gt=0)
    # Its share of the GPUs against other tenants with work waiting at the same priority
    # (1 = an equal share; 2 = twice the jobs of a tenant of weight 1).
    weight: float = Field(default=1.0, gt=0, le=1000)


@dataclass(frozen=True)
class Tenant:
    """One tenant: its name (recorded on its batches), its role and its limits."""

    name: str
    role: Role = Role.TENANT
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Caller:
    """The tenant behind one request, and the scope its idempotency keys are kept in."""

    tenant: Tenant
    scope: str  # a short digest of the caller's key (or "open"): Idempotency-Keys are per key

    @property
    def admin(self) -> bool:
        return self.tenant.role is Role.ADMIN

    @property
    def name(self) -> str:
        return self.tenant.name

    def sees(self, owner: str | None) -> bool:
        """Whether a batch of `owner` (None: no such batch) is visible to this caller."""
        return owner is not None and (self.admin or owner == self.tenant.name)

    def listing(self) -> str | None:
        """The tenant whose index this caller's lists read; None for every tenant's."""
        return None if self.admin else self.tenant.name


# Every caller of a farm with no keys: the local development farm, open as before tenants.
OPEN = Caller(Tenant(DEFAULT_TENANT, Role.ADMIN), scope="open")


@dataclass(frozen=True)
class Tenants:
    """The farm's tenants and the digests of their keys; `identify` finds a key's caller."""

    by_name: Mapping[str, Tenant]
    digests: tuple[tuple[bytes, str], ...]  # (SHA-256 of a key, its tenant's name)

    @property
    def open(self) -> bool:
        """No keys configured: every caller is `OPEN`."""
        return not self.digests

    def names(self) -> list[str]:
        return sorted(self.by_name)

    def weights(self) -> dict[str, float]:
        """Each tenant's share weight, for the dispatcher (a tenant not listed weighs 1)."""
        return {name: tenant.limits.weight for name, tenant in self.by_name.items()}

    def identify(self, key: str) -> Caller | None:
        """The caller whose key this is, or None. Every digest is compared, in constant time,
        so how long it takes tells nothing about which key (or how much of one) matched."""
        digest = hashlib.sha256(key.encode()).digest()
        matches = [name for known, name in self.digests if hmac.compare_digest(digest, known)]
        if not matches:
            return None
        return Caller(self.by_name[matches[0]], scope=digest.hex()[:16])


def load_tenants(settings: Settings) -> Tenants:
    """The tenants of the settings' keys and tenants file; ConfigError names what is wrong."""
    tenants: dict[str, Tenant] = {}
    defined_in: dict[str, str] = {}  # tenant -> the setting that defines it
    given_at: dict[bytes, str] = {}  # key digest -> where it was given, to refuse it twice
    table: list[tuple[bytes, str]] = []

    def add(tenant: Tenant, keys: list[tuple[bytes, str]], setting: str) -> None:
        if tenant.name in defined_in:
            raise ConfigError(
                f"tenant {tenant.name!r} is defined in {defined_in[tenant.name]} and in "
                f"{setting}; define each tenant in one place, with one role"
            )
        defined_in[tenant.name] = setting
        tenants[tenant.name] = tenant
        for digest, place in keys:
            if digest in given_at:
                raise ConfigError(
                    f"the same key is given twice ({given_at[digest]} and {place}); "
                    "each key belongs to one tenant"
                )
            given_at[digest] = place
            table.append((digest, tenant.name))

    for setting, entries, bare, role in (
        ("SDFARM_API_KEYS", settings.api_keys, DEFAULT_TENANT, Role.TENANT),
        ("SDFARM_ADMIN_KEYS", settings.admin_keys, ADMIN_TENANT, Role.ADMIN),
    ):
        by_tenant: dict[str, list[tuple[bytes, str]]] = {}
        for index, (name, key) in enumerate(parse_key_entries(entries, setting, bare), 1):
            digest = hashlib.sha256(key.encode()).digest()
            by_tenant.setdefault(name, []).append((digest, f"{setting} entry {index}"))
        for name, keys in by_tenant.items():
            add(Tenant(name, role), keys, setting)
    if settings.tenants_file is not None:
        entries_in_file = _read_tenants_file(settings.tenants_file)
        if not entries_in_file:
            raise ConfigError(
                f"SDFARM_TENANTS_FILE {settings.tenants_file} defines no tenants; a farm with a "
                "tenants file is never open: add a `[tenants.NAME]` table, or unset the setting"
            )
        for tenant, keys in entries_in_file:
            add(tenant, keys, "SDFARM_TENANTS_FILE")
    return Tenants(by_name=tenants, digests=tuple(table))


def parse_key_entries(entries: Iterable[str], setting: str, bare: str) -> list[tuple[str, str]]:
    """`(tenant, key)` of each `TENANT:KEY` or bare `KEY` entry (tenant `bare`).

    The messages never repeat an entry: any part of it may be a key, and they end up in logs.
    """
    out = []
    syntax = "entries look like TENANT:KEY or KEY, comma separated"
    for index, entry in enumerate(entries, 1):
        name, sep, key = entry.strip().partition(":")
        if not sep:
            name, key = bare, name
        name, key = name.strip(), key.strip()
        where = f"{setting} entry {index}"
        if sep and not name:
            raise ConfigError(f"{where} has nothing before its ':'; {syntax}")
        if not _NAME.match(name):
            raise ConfigError(
                f"{where}: the text before the first ':' is not a tenant name ({_NAME_RULE}); "
                f"a key itself may not hold ':'; {syntax}"
            )
        if not key:
            after = "after its ':'" if sep else "at all"
            raise ConfigError(f"{where} (tenant {name!r}) has no key {after}; {syntax}")
        if not _KEY.match(key):
            raise ConfigError(
                f"{where} (tenant {name!r}): a key is visible ASCII, no spaces; {syntax}"
            )
        out.append((name, key))
    return out


def _read_tenants_file(path: Path) -> list[tuple[Tenant, list[tuple[bytes, str]]]]:
    where = f"SDFARM_TENANTS_FILE {path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{where} cannot be read: {e.strerror or e}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from e
    unknown = sorted(set(data) - {"tenants"})
    if unknown or not isinstance(data.get("tenants"), dict):
        raise ConfigError(
            f"{where} must hold only `[tenants.NAME]` tables"
            + (f"; it has `{unknown[0][:40]}`" if unknown else "")
        )
    return [_tenant_entry(where, name, raw) for name, raw in data["tenants"].items()]


def _tenant_entry(where: str, name: str, raw: Any) -> tuple[Tenant, list[tuple[bytes, str]]]:
    if not _NAME.match(name):
        raise ConfigError(f"{where}: tenant name {name[:64]!r} must be {_NAME_RULE}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: `tenants.{name}` must be a table")
    clear = sorted(_CLEAR_TEXT_FIELDS & set(raw))
    if clear:
        raise ConfigError(
            f"{where}: tenant {name!r} has `{clear[0]}`, API keys in clear text; the file must "
            f"never hold a key: put each key's SHA-256 digest in `keys_sha256` ({_HOW_TO_DIGEST})"
        )
    fields = dict(raw)
    digests = fields.pop("keys_sha256", None)
    if not isinstance(digests, list) or not digests:
        raise ConfigError(
            f"{where}: tenant {name!r} needs `keys_sha256`, a list of its keys' SHA-256 digests "
            f"({_HOW_TO_DIGEST})"
        )
    given = []
    for index, digest in enumerate(digests):
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise ConfigError(
                f"{where}: tenant {name!r}, keys_sha256[{index}] is not a SHA-256 digest (64 hex "
                f"digits); the file holds digests of keys, never a key: {_HOW_TO_DIGEST}"
            )
        given.append((bytes.fromhex(digest), f"{where}, tenants.{name}.keys_sha256[{index}]"))
    role_text = fields.pop("role", Role.TENANT.value)
    if role_text not in {role.value for role in Role}:
        raise ConfigError(f"{where}: tenant {name!r}: `role` is 'tenant' or 'admin'")
    try:
        limits = Limits.model_validate(fields)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        field_name = ".".join(str(part) for part in first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            known = ", ".join(["keys_sha256", "role", *Limits.model_fields])
            message = f"unknown field; a tenant takes: {known}"
        raise ConfigError(f"{where}: tenant {name!r}, `{field_name}`: {message}") from None
    return Tenant(name, Role(role_text), limits), given
