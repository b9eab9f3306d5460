"""deploy/k8s: every manifest is valid Kubernetes, and the start-up script does what it says.

No Kubernetes cluster runs in CI: the manifests are checked against the Kubernetes schema
(kubernetes-validate, strict), and the node's start script runs here with a stand-in
`raftkv` that records how it was started.
"""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from raftkv.config import ClusterConfig

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = "1.30.0"  # the oldest still-supported minor we target; newer ones accept these too


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
@pytest.mark.parametrize("version", [VERSION, kubernetes_validate.latest_version()])
def test_every_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifests()]


def load(name: str) -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((K8S / name).read_text())  # type: ignore[no-any-return]


def test_the_set_an_operator_expects() -> None:
    sts = load("statefulset.yaml")
    pod = sts["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert sts["spec"]["serviceName"] == load("service-peers.yaml")["metadata"]["name"]
    assert load("service-peers.yaml")["spec"]["clusterIP"] == "None"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == 7001
    assert (
        container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    )
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9101"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # A quorum of 3 replicas survives what the budget allows.
    assert load("poddisruptionbudget.yaml")["spec"]["maxUnavailable"] == 1
    assert ast.parse(load("configmap.yaml")["data"]["prestop.py"])


def start(tmp_path: Path, pod: str, *, member: bool = False) -> list[str]:
    """Run start.sh for ``pod`` with a stand-in raftkv; return the arguments it got."""
    script = load("configmap.yaml")["data"]["start.sh"]
    data, scratch, bin_dir = tmp_path / "data", tmp_path / "tmp", tmp_path / "bin"
    for d in (data, scratch, bin_dir):
        d.mkdir(exist_ok=True)
    if member:
        (data / "view.pb").write_bytes(b"x")
    script = script.replace("/tmp/", f"{scratch}/").replace("/data", str(data))
    record = tmp_path / "args"
    stub = bin_dir / "raftkv"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "POD_NAME": pod,
        "POD_NAMESPACE": "kv",
        "RAFTKV_INITIAL_NODES": "3",
    }
    subprocess.run(["sh", "-c", script], env=env, check=True, capture_output=True, timeout=30)
    return record.read_text().splitlines()


def test_an_initial_pod_bootstraps_from_a_generated_cluster_file(tmp_path: Path) -> None:
    args = start(tmp_path, "raftkv-1")
    assert args[:1] == ["serve"] and "--join" not in args
    assert args[args.index("--id") + 1] == "raftkv-1"
    config = ClusterConfig.load(Path(args[args.index("--cluster") + 1]))
    assert config.node_ids == ("raftkv-0", "raftkv-1", "raftkv-2")
    assert config.node("raftkv-2").grpc == "raftkv-2.raftkv-peers.kv.svc.cluster.local:7001"
    assert config.node("raftkv-2").raft == "raftkv-2.raftkv-peers.kv.svc.cluster.local:7101"
    assert (config.shards, config.replicas) == (8, 3)
    assert "--secret-file" in args and "--auth-key-file" in args


def test_a_pod_added_by_scaling_joins(tmp_path: Path) -> None:
    args = start(tmp_path, "raftkv-4")
    assert "--cluster" not in args
    assert args[args.index("--grpc") + 1] == "raftkv-4.raftkv-peers.kv.svc.cluster.local:7001"
    assert "raftkv-0.raftkv-peers.kv.svc.cluster.local:7001" in args[args.index("--join") + 1]
    assert args[args.index("--join-token-file") + 1] == "/secrets/admin.token"


def test_a_member_restarts_from_its_data_dir_alone(tmp_path: Path) -> None:
    args = start(tmp_path, "raftkv-0", member=True)
    assert "--cluster" not in args and "--join" not in args
    assert args[args.index("--id") + 1] == "raftkv-0"
