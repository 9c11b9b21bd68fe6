"""Broker configuration: one frozen dataclass with documented defaults.

Precedence, lowest first: the defaults below < a TOML file (``--config``, or the
file named by ``STREAMD_CONFIG``) < ``STREAMD_<FIELD>`` environment variables (the
field name upper-cased: ``STREAMD_SEGMENT_BYTES``) < command-line flags. Every field
can come from the file and the environment; ``streamd serve`` has flags for the
common ones.

Every layer is checked on its own, so an error names where the bad value came from
(``environment variable STREAMD_FSYNC_POLICY: fsync_policy must be ...``): unknown
keys in the file, unknown ``STREAMD_*`` variables (other than the few the CLI and
test hooks read, ``OTHER_ENV``), values of the wrong type and values out of range are
all errors, never silently ignored. ``to_toml`` writes the effective config in a form
``load`` reads back unchanged.

Lower layers never see this object; the server hands them plain keyword arguments.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from streamd.addresses import split_address
from streamd.broker.errors import InvalidArgument
from streamd.broker.topic import TopicSettings

MiB = 1024 * 1024
DAY_MS = 24 * 3600 * 1000
ENV_PREFIX = "STREAMD_"
#: The environment variable naming a config file (``--config`` wins over it).
CONFIG_ENV = "STREAMD_CONFIG"
#: ``STREAMD_*`` variables that are not broker settings: read by the CLI, the
#: allocator tuning, the benchmark and test hooks. Any other unknown one is an error.
#: Client settings (``streamd.client._channel``): the CLI and SDK read them, the broker not.
CLIENT_ENV = frozenset({"STREAMD_TLS_CA", "STREAMD_TLS_CERT", "STREAMD_TLS_KEY", "STREAMD_TLS_SERVER_NAME",
                        "STREAMD_TOKEN"})
OTHER_ENV = frozenset({CONFIG_ENV, "STREAMD_SERVER", "STREAMD_MALLOC_TUNING"}) | CLIENT_ENV
OTHER_ENV_PREFIXES = ("STREAMD_TEST_", "STREAMD_BENCH_")

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A bad setting; ``field`` names it (None for an unknown key or a bad file)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class BrokerConfig:
    data_dir: Path = Path("./data")
    listen: str = "127.0.0.1:50051"
    #: Prometheus ``/metrics`` over HTTP (HOST:PORT); an empty string turns metrics off.
    metrics_listen: str = "127.0.0.1:9464"
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
    #: Concurrent RPCs (HTTP/2 streams) one client connection may have open; more
    #: wait on the client's side until one ends.
    max_concurrent_streams: int = 100
    #: Principals, tokens and allow rules (``streamd.auth``, TOML); empty: no
    #: authentication (open: fine on loopback, warned about anywhere else).
    auth_file: str = ""
    #: Seconds in-flight RPCs get to finish on SIGTERM/SIGINT.
    shutdown_grace_s: float = 10.0
    #: Seconds a stopping broker keeps answering (health NOT_SERVING, new work
    #: UNAVAILABLE) even when nothing is in flight, so load balancers that poll
    #: health see it leave; part of the grace period, and a second signal ends it.
    shutdown_drain_s: float = 0.0
    log_level: str = "INFO"  # DEBUG | INFO | WARNING | ERROR | CRITICAL
    log_format: str = "text"  # text (for people) | json (one object per line)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
        _check_values(self)

    @classmethod
    def load(
        cls,
        *,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        file: Path | None = None,
    ) -> BrokerConfig:
        """Merge the sources in precedence order; unknown keys and bad values are
        ``ConfigError`` naming their source. ``flags`` entries that are None are unset."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}
        if file is not None:
            source = f"config file {file}"
            for name, value in _read_file(file).items():
                values[name], origin[name] = _typed(name, value, source), source
        for key, raw in env.items():
            if key.startswith(ENV_PREFIX):
                env_name = _env_field(key)
                if env_name is not None:
                    source = f"environment variable {key}"
                    values[env_name], origin[env_name] = _parsed(env_name, raw, source), source
        for name, value in (flags or {}).items():
            if value is not None:
                source = f"flag --{name.replace('_', '-')}"
                _known(name, source)
                values[name], origin[name] = _typed(name, value, source), source
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{origin.get(exc.field or '', 'defaults')}: {exc}", field=exc.field) from None

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    def to_toml(self) -> str:
        """The whole config as TOML that ``load(file=...)`` reads back unchanged."""
        lines = ["# streamd effective configuration (streamd serve --print-config)"]
        for name, value in self.to_dict().items():
            if value is None:  # TOML has no null: left out, it stays unset (None)
                continue
            # A JSON string is a valid TOML basic string; ints and finite floats match too.
            lines.append(f"{name} = {json.dumps(value) if isinstance(value, str) else repr(value)}")
        return "\n".join(lines) + "\n"


#: Field name -> "int" | "float" | "str" | "Path"; ``OPTIONAL`` fields may also be None.
_TYPES = {f.name: str(f.type).removesuffix(" | None") for f in fields(BrokerConfig)}
OPTIONAL = frozenset(f.name for f in fields(BrokerConfig) if str(f.type).endswith(" | None"))
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "Path": "a path (string)"}


def _known(name: str, source: str) -> None:
    if name not in _TYPES:
        raise ConfigError(f"{source}: unknown setting {name!r}")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - set(_TYPES))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s): {', '.join(unknown)}")
    return doc


def _env_field(key: str) -> str | None:
    """The field a ``STREAMD_*`` variable sets, None for a non-config variable."""
    name = key[len(ENV_PREFIX):].lower()
    if name in _TYPES:
        return name
    if key in OTHER_ENV or key.startswith(OTHER_ENV_PREFIXES):
        return None
    raise ConfigError(f"unknown environment variable {key} (settings are STREAMD_<SETTING>, "
                      f"e.g. STREAMD_FSYNC_POLICY)")


def _typed(name: str, value: Any, source: str) -> Any:
    """A value from TOML or a flag: already typed, so only checked (ints may be floats)."""
    kind = _TYPES[name]
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind == "Path" and isinstance(value, str):
        value = Path(value)
    try:
        _check_type(name, value)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}", field=name) from None
    return value


def _parsed(name: str, raw: str, source: str) -> Any:
    """A value from the environment: text, parsed by the field's type."""
    kind = _TYPES[name]
    if name in OPTIONAL and raw == "":
        return None
    try:
        if kind == "int":
            return int(raw.strip())
        if kind == "float":
            return float(raw.strip())
    except ValueError:
        raise ConfigError(f"{source}: {name} must be {_TYPE_WORDS[kind]}, not {raw!r}", field=name) from None
    return Path(raw) if kind == "Path" else raw


def _check_type(name: str, value: Any) -> None:
    kind = _TYPES[name]
    if value is None and name in OPTIONAL:
        return
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "Path": isinstance(value, Path),
    }.get(kind, True)  # a kind not listed here is not checked
    if not ok:
        raise ConfigError(f"{name} must be {_TYPE_WORDS[kind]}, not {value!r}", field=name)


_POSITIVE = (
    "default_partitions", "index_interval_bytes", "max_request_bytes", "max_topics", "max_partitions_per_topic",
    "io_threads", "group_session_timeout_ms", "group_rebalance_timeout_ms", "group_retention_ms", "max_groups",
    "max_group_members", "retention_check_ms", "checkpoint_interval_ms", "max_concurrent_streams",
)


def _check_values(c: BrokerConfig) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{name} {why}, not {getattr(c, name)!r}", field=name)

    for name in _POSITIVE:
        if getattr(c, name) <= 0:
            raise bad(name, "must be positive")
    for name in ("shutdown_grace_s", "shutdown_drain_s"):
        value = getattr(c, name)
        if not (math.isfinite(value) and value >= 0):
            raise bad(name, "must be a number of seconds >= 0")
    if c.log_level.upper() not in LOG_LEVELS:
        raise bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    if c.log_format not in LOG_FORMATS:
        raise bad("log_format", f"must be one of {', '.join(LOG_FORMATS)}")
    for name in ("listen", "metrics_listen"):
        address = getattr(c, name)
        if address or name == "listen":
            try:
                split_address(address)
            except ValueError:
                raise bad(name, "must be HOST:PORT" + (" or empty" if name == "metrics_listen" else "")) from None
    if bool(c.tls_cert_file) != bool(c.tls_key_file):
        raise ConfigError("tls_cert_file and tls_key_file go together", field="tls_key_file")
    if c.tls_client_ca_file and not c.tls_cert_file:
        raise ConfigError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file",
                          field="tls_client_ca_file")
    # The topic defaults follow the same rules as a CreateTopic request's settings.
    try:
        TopicSettings(**{f.name: getattr(c, f.name) for f in fields(TopicSettings)}).validate()
    except InvalidArgument as exc:
        name = exc.field.removeprefix("config.")
        raise ConfigError(f"{name} {str(exc).split(': ', 1)[1]}, not {getattr(c, name)!r}", field=name) from None
