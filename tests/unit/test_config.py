"""Configuration parsing: bad values are ConfigErrors naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi_driver import config as cfg


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("1K", 1024), ("512M", 512 << 20), ("2G", 2 << 30), ("1GiB", 1 << 30),
     ("3t", 3 << 40)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert cfg.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1G", "1.5G", "1P"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(cfg.ConfigError):
        cfg.parse_size(text)


def test_endpoints() -> None:
    assert cfg.parse_etcd_endpoints("http://10.0.0.1:2379, 127.0.0.1:1") == (
        "http://10.0.0.1:2379",
        "127.0.0.1:1",
    )
    with pytest.raises(cfg.ConfigError):
        cfg.parse_etcd_endpoints("http://nohost")
    with pytest.raises(cfg.ConfigError):
        cfg.parse_unix_endpoint("tcp://x", "--csi-endpoint")
    assert cfg.parse_unix_endpoint("unix:///a/b.sock", "--x") == Path("/a/b.sock")


def _node(**changes: object) -> cfg.NodeConfig:
    base: dict[str, object] = dict(
        node_id="n1", csi_socket=Path("/s"), agent_listen=("h", 1), replica_listen=("h", 2),
        etcd=cfg.EtcdConfig(("h:1",)), pool_kind="file", pool_dir=Path("/p"),
        pool_size=1 << 30, lvm_vg=None, lvm_thin_pool=None, state_dir=Path("/st"),
        cluster_secret_file=Path("/secret"), agent_public_key_file=Path("/pub"),
    )
    base.update(changes)
    return cfg.NodeConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [{"node_id": "bad/id"}, {"pool_kind": "zfs"}, {"pool_size": 0}, {"pool_kind": "lvm"},
     {"lease_ttl_s": 0.1}, {"max_volumes": -1}],
)
def test_node_config_rejects(changes: dict[str, object]) -> None:
    with pytest.raises(cfg.ConfigError):
        _node(**changes)


def test_node_config_ok() -> None:
    assert _node().agent_address == "h:1"
