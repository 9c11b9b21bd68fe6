from __future__ import annotations

import zlib

import pytest

from streamd.config import BrokerConfig
from streamd.partitioner import key_partition


def test_partitioner_is_crc32_ieee_mod_partitions():
    # Known CRC-32 (IEEE) check value of "123456789".
    assert zlib.crc32(b"123456789") == 0xCBF43926
    assert key_partition(b"123456789", 7) == 0xCBF43926 % 7
    assert {key_partition(b"k%d" % i, 4) for i in range(100)} == {0, 1, 2, 3}


def test_config_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    f = tmp_path / "streamd.toml"
    f.write_text('listen = "127.0.0.1:1"\nsegment_bytes = 4096\nfsync_policy = "never"\n')
    env = {"STREAMD_SEGMENT_BYTES": "8192", "STREAMD_FSYNC_POLICY": "interval"}
    config = BrokerConfig.load(flags={"fsync_policy": "always"}, env=env, file=f)
    assert (config.listen, config.segment_bytes, config.fsync_policy) == ("127.0.0.1:1", 8192, "always")
    assert config.retention_bytes == -1  # default


def test_config_rejects_unknown_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        BrokerConfig.load(flags={"nope": 1}, env={})
    with pytest.raises(ValueError, match="fsync_policy"):
        BrokerConfig.load(flags={"fsync_policy": "sometimes"}, env={})
