from pathlib import Path

import pytest

from raftkv.config import ClusterConfig, ConfigError, Limits
from raftkv.errors import InvalidArgument

GOOD = """
shards = 4
replicas = 2
[nodes.n1]
grpc = "127.0.0.1:7001"
raft = "127.0.0.1:7101"
[nodes.n2]
grpc = "127.0.0.1:7002"
raft = "127.0.0.1:7102"
"""


def test_loads_the_design_format(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(GOOD)
    c = ClusterConfig.load(f)
    assert c.shards == 4 and c.replicas == 2 and c.node_ids == ("n1", "n2")
    assert c.node("n2").raft == "127.0.0.1:7102"


def test_round_trips_through_to_toml(tmp_path: Path) -> None:
    c = ClusterConfig.local(3, 8, 3, 7001)
    f = tmp_path / "c.toml"
    f.write_text(c.to_toml())
    assert ClusterConfig.load(f) == c
    assert ClusterConfig.load(f).fingerprint == c.fingerprint


def test_fingerprint_changes_with_the_cluster() -> None:
    a = ClusterConfig.local(3, 8, 3, 7001)
    assert a.fingerprint != ClusterConfig.local(3, 4, 3, 7001).fingerprint
    assert a.fingerprint != ClusterConfig.local(3, 8, 2, 7001).fingerprint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("shards = 2\n", "nodes"),
        (GOOD.replace("replicas = 2", "replicas = 3"), "replicas"),
        (GOOD.replace('"127.0.0.1:7002"', '"127.0.0.1:7001"'), "twice"),
        (GOOD.replace('"127.0.0.1:7102"', '"nohost"'), "HOST:PORT"),
        ("bogus = 1\n" + GOOD, "unknown"),
        (GOOD + "extra = 1\n", "unknown"),
        ("shards = [", "not valid TOML"),
        # A typo in a node table names the typo, not the key it hides.
        (GOOD.replace("grpc = ", "grcp = ", 1), r"unknown keys: grcp \(a node table takes"),
        (GOOD.replace('raft = "127.0.0.1:7101"\n', "", 1), "needs its raft address"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        ClusterConfig.load(f)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ClusterConfig.load(tmp_path / "nope.toml")


def test_limits() -> None:
    limits = Limits()
    limits.check(b"k", b"v" * limits.max_value_bytes)
    for key, value in ((b"", None), (b"k" * 4097, None), (b"k", b"v" * (1024 * 1024 + 1))):
        with pytest.raises(InvalidArgument):
            limits.check(key, value)
