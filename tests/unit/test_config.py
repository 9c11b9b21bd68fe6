"""BrokerConfig: every setting from every layer, precedence, errors naming their source,
and ``streamd serve --print-config`` output that reads back as the same config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streamd.cli.main import main
from streamd.config import BrokerConfig, ConfigError

DEFAULTS = BrokerConfig()
#: Non-default values for the string settings (numbers are derived from the default).
STRINGS = {
    "listen": "0.0.0.0:6000",
    "fsync_policy": "interval",
    "compression": "lz4",
    "log_level": "DEBUG",
    "log_format": "json",
    "metrics_listen": "127.0.0.1:9999",
    "tls_cert_file": "/etc/streamd/tls.pem",
    "tls_key_file": "/etc/streamd/tls.key",
    "tls_client_ca_file": "/etc/streamd/clients-ca.pem",
    "auth_file": "/etc/streamd/auth.toml",
}


def other_values() -> dict:
    """A valid, non-default value for every field."""
    out = {}
    for f in dataclasses.fields(BrokerConfig):
        default = getattr(DEFAULTS, f.name)
        if isinstance(default, Path):
            out[f.name] = Path("/srv/streamd-data")
        elif isinstance(default, float):
            out[f.name] = default + 1.5
        elif isinstance(default, int):
            out[f.name] = default * 2 if default > 0 else 1000
        else:
            assert f.name in STRINGS, f"add a non-default value for {f.name} to STRINGS"
            out[f.name] = STRINGS[f.name]
    assert all(out[k] != getattr(DEFAULTS, k) for k in out)
    return out


def toml_value(value) -> str:
    return f'"{value}"' if isinstance(value, (str, Path)) else repr(value)


def test_every_setting_can_come_from_the_config_file(tmp_path):
    wanted = other_values()
    f = tmp_path / "streamd.toml"
    f.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in wanted.items()))
    assert BrokerConfig.load(file=f, env={}) == BrokerConfig(**wanted)


def test_every_setting_can_come_from_the_environment():
    wanted = other_values()
    env = {"STREAMD_" + k.upper(): str(v) for k, v in wanted.items()}
    assert BrokerConfig.load(env=env) == BrokerConfig(**wanted)


def test_precedence_is_defaults_then_file_then_env_then_flags(tmp_path):
    f = tmp_path / "streamd.toml"
    f.write_text('segment_bytes = 8192\nretention_ms = 5000\nio_threads = 3\n')
    env = {"STREAMD_RETENTION_MS": "6000", "STREAMD_IO_THREADS": "5"}
    config = BrokerConfig.load(file=f, env=env, flags={"io_threads": 7, "listen": None})
    assert config.max_topics == DEFAULTS.max_topics  # default
    assert config.segment_bytes == 8192  # file over default
    assert config.retention_ms == 6000  # env over file
    assert config.io_threads == 7  # flag over env
    assert config.listen == DEFAULTS.listen  # an unset flag (None) changes nothing


def test_unknown_keys_are_errors_in_every_layer(tmp_path):
    f = tmp_path / "streamd.toml"
    f.write_text('segmnet_bytes = 8192\n')
    with pytest.raises(ConfigError, match=f"config file {f}: unknown setting.*segmnet_bytes"):
        BrokerConfig.load(file=f, env={})
    with pytest.raises(ConfigError, match="unknown environment variable STREAMD_FSYNC"):
        BrokerConfig.load(env={"STREAMD_FSYNC": "never"})
    with pytest.raises(ConfigError, match="flag --nope: unknown setting"):
        BrokerConfig.load(flags={"nope": 1}, env={})
    # variables of the CLI, the allocator and the test hooks are not settings
    env = {"STREAMD_SERVER": "x:1", "STREAMD_TEST_CRASH_AFTER_APPEND": "3", "STREAMD_CONFIG": "f", "HOME": "/"}
    assert BrokerConfig.load(env=env) == DEFAULTS


def test_bad_values_are_errors_naming_their_source(tmp_path):
    f = tmp_path / "streamd.toml"
    f.write_text('segment_bytes = "big"\n')
    with pytest.raises(ConfigError, match=f"config file {f}: segment_bytes must be an integer, not 'big'"):
        BrokerConfig.load(file=f, env={})
    f.write_text('io_threads = 0\n')
    with pytest.raises(ConfigError, match=f"config file {f}: io_threads must be positive, not 0"):
        BrokerConfig.load(file=f, env={})
    f.write_text('segment_bytes = [\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        BrokerConfig.load(file=f, env={})
    with pytest.raises(ConfigError, match="environment variable STREAMD_RETENTION_MS: retention_ms must be an integer"):
        BrokerConfig.load(env={"STREAMD_RETENTION_MS": "7d"})
    with pytest.raises(ConfigError, match="environment variable STREAMD_LOG_FORMAT: log_format must be one of"):
        BrokerConfig.load(env={"STREAMD_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="environment variable STREAMD_SEGMENT_BYTES: segment_bytes must be betw"):
        BrokerConfig.load(env={"STREAMD_SEGMENT_BYTES": "100"})
    with pytest.raises(ConfigError, match="flag --fsync-policy: fsync_policy must be one of"):
        BrokerConfig.load(flags={"fsync_policy": "sometimes"}, env={})
    with pytest.raises(ConfigError, match="flag --listen: listen must be HOST:PORT"):
        BrokerConfig.load(flags={"listen": "localhost"}, env={})
    with pytest.raises(ConfigError, match="shutdown_grace_s must be a number of seconds >= 0"):
        BrokerConfig(shutdown_grace_s=-1.0)


def test_print_config_round_trips_through_config(tmp_path, capsys, monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("STREAMD_")]:
        monkeypatch.delenv(key)
    first = tmp_path / "first.toml"
    first.write_text('retention_ms = 5000\nshutdown_grace_s = 2.5\nlog_format = "json"\n')
    monkeypatch.setenv("STREAMD_IO_THREADS", "6")
    argv = ["serve", "--config", str(first), "--data-dir", str(tmp_path / "d"), "--fsync", "never",
            "--print-config"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    effective = BrokerConfig.load(file=first, env={"STREAMD_IO_THREADS": "6"},
                                  flags={"data_dir": tmp_path / "d", "fsync_policy": "never"})
    (tmp_path / "printed.toml").write_text(printed)
    monkeypatch.delenv("STREAMD_IO_THREADS")
    assert BrokerConfig.load(file=tmp_path / "printed.toml", env={}) == effective
    assert "io_threads = 6\n" in printed and 'fsync_policy = "never"\n' in printed
    # the file can also be named by STREAMD_CONFIG
    monkeypatch.setenv("STREAMD_CONFIG", str(tmp_path / "printed.toml"))
    assert main(["serve", "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_serve_reports_a_bad_setting_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STREAMD_FSYNC_POLICY", "sometimes")
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--print-config"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "STREAMD_FSYNC_POLICY" in err
