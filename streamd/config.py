"""Broker configuration: one frozen dataclass with documented defaults.

Precedence: command-line flags > ``STREAMD_*`` environment variables > a TOML file
(``--config``) > the defaults below. Lower layers never see this object; the server
hands them plain keyword arguments.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class BrokerConfig:
    data_dir: Path = Path("./data")
    listen: str = "127.0.0.1:50051"
    #: Topic defaults, used where CreateTopic leaves a setting out.
    default_partitions: int = 1
    retention_ms: int = 7 * DAY_MS
    retention_bytes: int = -1
    segment_bytes: int = 256 * MiB
    segment_ms: int = 7 * DAY_MS
    max_record_bytes: int = 1 * MiB
    fsync_policy: str = "always"  # always | interval | never
    fsync_interval_ms: int = 1000
    compression: str = "producer"  # producer (keep as sent) | lz4
    #: Idempotency keys are deduplicated per partition within this window; 0: off.
    dedup_window_ms: int = 0
    #: Sparse index: one entry per this many log bytes.
    index_interval_bytes: int = 4096
    #: Largest gRPC request accepted (bigger ones get RESOURCE_EXHAUSTED from gRPC).
    max_request_bytes: int = 64 * MiB
    max_topics: int = 10_000
    max_partitions_per_topic: int = 1_000
    #: How often retention runs, and how often recovery points are checkpointed
    #: (a crash rescans at most this much of each partition's recent data).
    retention_check_ms: int = 30_000
    checkpoint_interval_ms: int = 5_000
    #: Consumer groups: defaults for members that do not choose, limits, and how long
    #: the offsets of a group without members are kept after its last commit.
    group_session_timeout_ms: int = 10_000
    group_rebalance_timeout_ms: int = 30_000
    group_retention_ms: int = 7 * DAY_MS
    max_groups: int = 10_000
    max_group_members: int = 1_000
    #: Threads for fsync and other blocking storage work.
    io_threads: int = 4
    #: TLS: the server's certificate chain and private key (PEM files); both or neither.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: Mutual TLS: clients must present a certificate signed by this CA (PEM file).
    tls_client_ca_file: str = ""
    #: Principals, tokens and allow rules (``streamd.auth``, TOML); empty: no
    #: authentication (open: fine on loopback, warned about anywhere else).
    auth_file: str = ""
    #: Seconds in-flight RPCs get to finish on SIGTERM/SIGINT.
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.fsync_policy not in ("always", "interval", "never"):
            raise ValueError(f"fsync_policy must be always, interval or never, not {self.fsync_policy!r}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.compression not in ("producer", "lz4"):
            raise ValueError(f"compression must be producer or lz4, not {self.compression!r}")
        for name in ("default_partitions", "segment_bytes", "max_record_bytes", "index_interval_bytes",
                     "max_request_bytes", "max_topics", "max_partitions_per_topic", "io_threads",
                     "group_session_timeout_ms", "group_rebalance_timeout_ms", "group_retention_ms",
                     "max_groups", "max_group_members"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @classmethod
    def load(
        cls,
        *,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        file: Path | None = None,
    ) -> "BrokerConfig":
        """Merge the sources in precedence order; unknown keys are errors."""
        values: dict[str, Any] = {}
        if file is not None:
            with open(file, "rb") as fh:
                values.update(_checked(tomllib.load(fh), f"config file {file}"))
        env = os.environ if env is None else env
        for f in fields(cls):
            raw = env.get("STREAMD_" + f.name.upper())
            if raw is not None:
                values[f.name] = raw
        values.update({k: v for k, v in _checked(flags or {}, "flags").items() if v is not None})
        return cls(**{k: _coerce(k, v) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


_TYPES = {f.name: f.type for f in fields(BrokerConfig)}


def _checked(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        raise ValueError(f"unknown setting(s) in {source}: {', '.join(unknown)}")
    return dict(values)


def _coerce(name: str, value: Any) -> Any:
    kind = _TYPES[name]
    if kind == "Path":
        return Path(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return str(value)
