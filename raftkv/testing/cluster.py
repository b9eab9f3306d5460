"""``LocalCluster``: N real ``raftkv serve`` processes on loopback, as a reusable library.

Like hashicorp/raft's ``testing.go``, the test cluster ships with the package: the integration
and fault tests use it, and so does ``raftkv local up``. Each node is a separate OS process with
its own data dir and log dir, started from one cluster file; helpers kill (SIGKILL), pause
(SIGSTOP/SIGCONT), stop (SIGTERM) and restart nodes by the PIDs this object started, and wait
on conditions with deadlines, never on bare sleeps.

Nodes can be given their own loopback address (127.0.0.11, .12, ...) so a fault injector can
cut one node's traffic with iptables.

``secure=True`` runs the cluster the way docs/security.md tells users to: a CA and node
certificates (TLS on the gRPC port, mutual TLS on the Raft port), a cluster secret and minted
bearer tokens (:mod:`raftkv.credentials`); the helpers here and :meth:`LocalCluster.client`
then connect with the CA and the admin token.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raftkv import certs
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv.client import Client
from raftkv.config import ClusterConfig, NodeAddress
from raftkv.credentials import Credentials, create
from raftkv.network import Dialer

T = TypeVar("T")


# Ports this process has handed out: the kernel may offer a port again as soon as the probe
# socket is closed, and two nodes of one cluster must never get the same one.
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port that was not handed out already")


def wait_for(
    condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``condition`` until it returns a truthy value, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # conditions probe live processes; errors mean "not yet"
            last_error = e
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:.1f}s waiting for {what}"
                + (f" (last error: {last_error!r})" if last_error else "")
            )
        time.sleep(interval)


def interrupt(proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Stop a foreground command (``raftkv local up``, ``top``) as Ctrl-C would: SIGINT, then
    wait; SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    """File descriptors a process holds open (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class NodeProcess:
    address: NodeAddress
    data_dir: Path
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def id(self) -> str:
        return self.address.id

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LocalCluster:
    """Real node processes on this machine. Use as a context manager so they always stop."""

    def __init__(
        self,
        config: ClusterConfig,
        base_dir: Path,
        *,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        secure: bool = False,
        node_args: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        """``extra_args`` go to every node's ``serve``; ``node_args`` to one node's, by id
        (its own metrics port, say), at every start."""
        self.config = config
        self.base_dir = Path(base_dir)
        self.cluster_file = self.base_dir / "cluster.toml"
        self.extra_args = extra_args
        self.node_args = dict(node_args or {})
        self.env = env
        self.credentials: Credentials | None = None
        self.dialer = Dialer()
        if secure:
            directory = self.base_dir / "secure"
            self.credentials = (
                Credentials(directory)
                if (directory / "admin.token").exists()
                else create(directory, config)
            )
            self.dialer = Dialer(self.credentials.client_tls(), self.credentials.token)
        self.nodes = {
            n.id: NodeProcess(n, self.base_dir / "data" / n.id, self.base_dir / "logs")
            for n in config.nodes
        }
        # Nodes started with serve --join rather than from the cluster file.
        self.joined: set[str] = set()

    @classmethod
    def create(
        cls,
        base_dir: Path,
        *,
        nodes: int = 3,
        shards: int = 8,
        replicas: int = 3,
        hosts: list[str] | None = None,
        **kwargs: object,
    ) -> LocalCluster:
        """A cluster on free ports; ``hosts`` gives each node its own loopback address."""
        addrs = []
        for i in range(1, nodes + 1):
            host = hosts[i - 1] if hosts else "127.0.0.1"
            addrs.append(
                NodeAddress(f"n{i}", f"{host}:{free_port(host)}", f"{host}:{free_port(host)}")
            )
        config = ClusterConfig(shards=shards, replicas=replicas, nodes=tuple(addrs))
        return cls(config, base_dir, **kwargs)  # type: ignore[arg-type]

    # -- processes -------------------------------------------------------------------------

    def start(self, wait: bool = True, timeout: float = 30.0) -> LocalCluster:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.cluster_file.write_text(self.config.to_toml())
        for node_id in self.nodes:
            self.start_node(node_id, wait=False)
        if wait:
            self.wait_healthy(timeout)
            self.wait_leaders(timeout)
        return self

    def add_node(
        self, node_id: str, host: str = "127.0.0.1", wait: bool = True, start: bool = True
    ) -> NodeProcess:
        """Start a new node that joins the running cluster (``serve --join``); with
        ``start=False`` only pick its addresses (start it later with ``start_node``)."""
        if node_id in self.nodes:
            raise RuntimeError(f"node {node_id} exists already")
        address = NodeAddress(node_id, f"{host}:{free_port(host)}", f"{host}:{free_port(host)}")
        self.nodes[node_id] = NodeProcess(
            address, self.base_dir / "data" / node_id, self.base_dir / "logs"
        )
        self.joined.add(node_id)
        if self.credentials is not None and not self.credentials.node_cert(node_id)[0].exists():
            certs.create_node_cert(self.credentials.directory, node_id, [host, node_id])
        if start:
            self.start_node(node_id, wait=wait)
        return self.nodes[node_id]

    def forget_node(self, node_id: str) -> None:
        """Stop a node and drop it from this object (after it was removed, or is dead)."""
        self.kill(node_id)
        del self.nodes[node_id]

    def command(self, node_id: str, args: tuple[str, ...] = ()) -> list[str]:
        n = self.nodes[node_id]
        if node_id in self.joined:
            # Whoever is a member now (the nodes of the cluster file may all have left).
            others = [m.address.grpc for m in self.nodes.values() if m.id != node_id]
            where = [
                "--join",
                ",".join(others),
                "--grpc",
                n.address.grpc,
                "--raft",
                n.address.raft,
            ]
            if self.credentials is not None:
                where += ["--join-token-file", self.credentials.client_env()["RAFTKV_TOKEN_FILE"]]
        else:
            where = ["--cluster", str(self.cluster_file)]
        return [
            sys.executable,
            "-m",
            "raftkv",
            "serve",
            *where,
            "--id",
            node_id,
            "--data-dir",
            str(n.data_dir),
            "--log-dir",
            str(n.log_dir),
            *(self.credentials.serve_args(node_id) if self.credentials else ()),
            *self.extra_args,
            *self.node_args.get(node_id, ()),
            *args,
        ]

    def start_node(
        self, node_id: str, wait: bool = True, timeout: float = 30.0, args: tuple[str, ...] = ()
    ) -> None:
        """Start one node; ``args`` go to this start only (``--recover-from-peers``...)."""
        n = self.nodes[node_id]
        if n.running:
            raise RuntimeError(f"node {node_id} is already running (pid {n.pid})")
        n.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(n.log_dir / f"{node_id}.stdout", "ab")  # noqa: SIM115 - owned by the child
        env = {**os.environ, "RAFTKV_DIE_WITH_PARENT": "1", **(self.env or {})}
        n.process = subprocess.Popen(
            self.command(node_id, args), stdout=out, stderr=subprocess.STDOUT, env=env
        )
        out.close()
        n.paused = False
        if wait:
            self.wait_healthy(timeout, [node_id])

    def kill(self, node_id: str) -> None:
        """SIGKILL: the process gets no chance to flush or say goodbye."""
        n = self.nodes[node_id]
        if n.process is not None and n.running:
            if n.paused:
                n.process.send_signal(signal.SIGCONT)
            n.process.kill()
            n.process.wait(10)
        n.paused = False

    def stop_node(self, node_id: str, timeout: float = 10.0) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        n = self.nodes[node_id]
        if n.process is None or not n.running:
            return
        if n.paused:
            n.process.send_signal(signal.SIGCONT)
            n.paused = False
        n.process.terminate()
        try:
            n.process.wait(timeout)
        except subprocess.TimeoutExpired:
            n.process.kill()
            n.process.wait(10)

    def pause(self, node_id: str) -> None:
        n = self.nodes[node_id]
        if n.process is not None and n.running:
            n.process.send_signal(signal.SIGSTOP)
            n.paused = True

    def resume(self, node_id: str) -> None:
        n = self.nodes[node_id]
        if n.process is not None and n.running and n.paused:
            n.process.send_signal(signal.SIGCONT)
            n.paused = False

    def pid(self, node_id: str) -> int:
        """The PID of a running node (fails if it is not running)."""
        pid = self.nodes[node_id].pid
        if pid is None or not self.nodes[node_id].running:
            raise RuntimeError(f"node {node_id} is not running")
        return pid

    def restart(self, node_id: str, wait: bool = True) -> None:
        self.kill(node_id)
        self.start_node(node_id, wait=wait)

    def kill_all(self) -> None:
        for node_id in self.nodes:
            self.kill(node_id)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every node at once, wait for all, SIGKILL whatever is left."""
        for n in self.nodes.values():
            if n.process is not None and n.running:
                if n.paused:
                    n.process.send_signal(signal.SIGCONT)
                    n.paused = False
                n.process.terminate()
        deadline = time.monotonic() + timeout
        for n in self.nodes.values():
            if n.process is None:
                continue
            try:
                n.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.process.kill()
                n.process.wait(10)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        # Best effort: a failing test must still leave no process behind.
        for node_id in self.nodes:
            with contextlib.suppress(Exception):
                self.resume(node_id)
        self.stop()
        for n in self.nodes.values():
            if n.process is not None and n.process.poll() is None:
                n.process.kill()

    # -- probes ----------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [n.address.grpc for n in self.nodes.values()]

    def endpoint(self, node_id: str) -> str:
        return self.nodes[node_id].address.grpc

    def running_endpoints(self) -> list[str]:
        return [n.address.grpc for n in self.nodes.values() if n.running and not n.paused]

    @contextlib.contextmanager
    def channel(self, node_id: str) -> Iterator[grpc.Channel]:
        with self.dialer.sync_channel(self.endpoint(node_id)) as ch:
            yield ch

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata for the helpers' own RPCs (the admin token, when secure)."""
        return self.dialer.metadata

    def client(self, endpoints: list[str] | None = None, **kwargs: object) -> Client:
        """A :class:`Client` for this cluster, with its TLS and token settings."""
        return Client(
            endpoints or self.endpoints,
            tls=self.dialer.tls,
            token=self.credentials.token if self.credentials else None,
            **kwargs,  # type: ignore[arg-type]
        )

    def healthy(self, node_id: str) -> bool:
        with self.channel(node_id) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_healthy(self, timeout: float = 30.0, node_ids: list[str] | None = None) -> None:
        for node_id in node_ids or list(self.nodes):
            n = self.nodes[node_id]

            def up(n: NodeProcess = n) -> bool:
                if n.process is not None and n.process.poll() is not None:
                    log = (n.log_dir / f"{n.id}.stdout").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"node {n.id} exited with {n.process.returncode}:\n{log}")
                return self.healthy(n.id)

            try:
                wait_for(up, timeout, f"node {node_id} to be healthy")
            except RuntimeError:
                raise

    def status(self, node_id: str | None = None, timeout: float = 3.0) -> kv.StatusResponse:
        target = node_id or next(n.id for n in self.nodes.values() if n.running and not n.paused)
        with self.channel(target) as ch:
            resp: kv.StatusResponse = kv_grpc.ClusterStub(ch).Status(
                kv.StatusRequest(), timeout=timeout, metadata=self.metadata
            )
        return resp

    def leaders(self, node_id: str | None = None) -> dict[int, str]:
        """shard → leader node id, for every shard that has a leader right now."""
        return {s.shard_id: s.leader for s in self.status(node_id).shards if s.leader}

    def wait_leaders(
        self, timeout: float = 30.0, exclude: set[str] | None = None
    ) -> dict[int, str]:
        """Wait until every shard has a leader (not among ``exclude``)."""
        bad = exclude or set()

        def all_led() -> dict[int, str] | None:
            leaders = self.leaders()
            ok = len(leaders) == self.config.shards and not set(leaders.values()) & bad
            return leaders if ok else None

        return wait_for(all_led, timeout, "every shard to have a leader")

    def leader_counts(self) -> dict[str, int]:
        counts = {n: 0 for n in self.nodes}
        for leader in self.leaders().values():
            counts[leader] = counts.get(leader, 0) + 1
        return counts

    def busiest_leader(self) -> str:
        counts = self.leader_counts()
        return max(counts, key=lambda n: counts[n])
