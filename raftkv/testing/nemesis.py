"""Fault injection under load, with the recorded history checked afterwards.

This is our version of the etcd robustness tests and of Jepsen: concurrent clients run put, get
and compare-and-swap against a small key set (so operations conflict) on a real
:class:`~raftkv.testing.cluster.LocalCluster`, while a nemesis repeatedly injects one of five
faults:

* ``kill``: SIGKILL the node that leads the most shards, then restart it;
* ``pause``: SIGSTOP a node for a while, then SIGCONT it;
* ``partition``: cut one node's Raft traffic from the others with iptables, then heal it
  (root only; each node has its own loopback address, and the transport binds outgoing Raft
  connections to it, so a rule on that address cuts exactly that node);
* ``kill-all``: SIGKILL every node at once, then restart them all;
* ``membership``: a node joins (``serve --join``) and replicas move onto it, or a random node
  is drained and removed (``member remove``), in turn: the cluster grows from 3 to 4 to 5 nodes,
  shrinks back to 3, and so on, and every group goes through Raft membership changes while the
  clients run.

Every operation is recorded with its invocation time, completion time and outcome (ok, failed,
unknown). Afterwards we check that (1) the history is linearizable per key
(:mod:`raftkv.testing.linearizability`), (2) no acknowledged write is lost: every key of an
append-only series whose put was acknowledged is read back with its value, and (3) once healed,
every replica of every shard reports the same applied index and the same data digest.
Runs are bounded in fault count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv._pb.raftkv.v1 import kv_pb2_grpc as kv_grpc
from raftkv.client import Client
from raftkv.errors import (
    InvalidArgument,
    KeyNotFound,
    PreconditionFailed,
    RaftKVError,
)
from raftkv.testing.cluster import LocalCluster, wait_for
from raftkv.testing.history import History, Outcome
from raftkv.testing.linearizability import CheckResult, check

log = logging.getLogger("raftkv.nemesis")

FAULT_KINDS = ("kill", "pause", "partition", "kill-all", "membership")
# The membership fault keeps the cluster between these sizes.
MIN_NODES, MAX_NODES = 3, 5
# A membership change waits this long for the replicas to settle.
MOVE_SETTLE_S = 90.0


def loopback_hosts(n: int) -> list[str]:
    """One loopback address per node: 127.0.0.11, .12, ..."""
    return [f"127.0.0.{11 + i}" for i in range(n)]


class Partitioner:
    """Cuts a node's Raft traffic with iptables rules in a chain of our own."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.chain = f"RAFTKV-{os.getpid()}"
        self._installed = False

    @property
    def ports(self) -> str:
        """The Raft ports of the nodes there are now (membership moves change them)."""
        return ",".join(n.address.raft.rsplit(":", 1)[1] for n in self.cluster.nodes.values())

    @staticmethod
    def available() -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "not root"
        if shutil.which("iptables") is None:
            return False, "iptables is not installed"
        probe = subprocess.run(["iptables", "-S", "OUTPUT"], capture_output=True, text=True)
        if probe.returncode != 0:
            return False, f"iptables does not work here: {probe.stderr.strip()}"
        return True, ""

    def _iptables(self, *args: str) -> None:
        subprocess.run(["iptables", "-w", "5", *args], check=True, capture_output=True)

    def install(self) -> None:
        self._iptables("-N", self.chain)
        self._iptables("-I", "OUTPUT", "-j", self.chain)
        self._installed = True

    def cut(self, node_id: str) -> None:
        ip = self.cluster.nodes[node_id].address.raft.rsplit(":", 1)[0]
        for direction in ("-s", "-d"):
            self._iptables(
                "-A", self.chain, "-p", "tcp", direction, ip,
                "-m", "multiport", "--ports", self.ports, "-j", "DROP",
            )  # fmt: skip

    def split(self, side: set[str]) -> None:
        """Cut the Raft traffic between ``side`` and every other node; each side still
        talks within itself."""

        def ip(node_id: str) -> str:
            return self.cluster.nodes[node_id].address.raft.rsplit(":", 1)[0]

        others = [n for n in self.cluster.nodes if n not in side]
        for a in sorted(side):
            for b in others:
                for src, dst in ((ip(a), ip(b)), (ip(b), ip(a))):
                    self._iptables(
                        "-A", self.chain, "-p", "tcp", "-s", src, "-d", dst,
                        "-m", "multiport", "--ports", self.ports, "-j", "DROP",
                    )  # fmt: skip

    def heal(self) -> None:
        self._iptables("-F", self.chain)

    def remove(self) -> None:
        if not self._installed:
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            self._iptables("-F", self.chain)
        with contextlib.suppress(subprocess.CalledProcessError):
            self._iptables("-D", "OUTPUT", "-j", self.chain)
        with contextlib.suppress(subprocess.CalledProcessError):
            self._iptables("-X", self.chain)
        self._installed = False


@dataclass
class Fault:
    kind: str
    node: str
    start: float
    end: float = 0.0
    # A move that did not finish in MOVE_SETTLE_S (the run goes on, and reports it).
    stuck: str = ""


@dataclass
class RunReport:
    faults: list[Fault] = field(default_factory=list)
    operations: int = 0
    ok_operations: int = 0
    unknown_operations: int = 0
    acknowledged_series: int = 0
    lost_writes: list[bytes] = field(default_factory=list)
    check: CheckResult | None = None
    converged: bool = False
    divergence: str = ""
    skipped_kinds: dict[str, str] = field(default_factory=dict)
    history_path: Path | None = None

    @property
    def ok(self) -> bool:
        return self.check is not None and self.check.ok and not self.lost_writes and self.converged

    @property
    def stuck_moves(self) -> list[str]:
        return [f"{f.node}: {f.stuck}" for f in self.faults if f.stuck]

    def fault_counts(self) -> dict[str, int]:
        counts = {k: 0 for k in FAULT_KINDS}
        for f in self.faults:
            counts[f.kind] += 1
        return counts

    def summary(self) -> str:
        c = self.check
        return (
            f"faults {self.fault_counts()} (skipped: {self.skipped_kinds or 'none'}); "
            f"operations {self.operations} (ok {self.ok_operations}, unknown "
            f"{self.unknown_operations}); acknowledged series writes {self.acknowledged_series}, "
            f"lost {len(self.lost_writes)}; linearizable: "
            f"{'yes' if c and c.ok else 'NO'} ({c.keys_checked if c else 0} keys, "
            f"{len(c.violations) if c else '?'} violations, "
            f"{len(c.timed_out_keys) if c else '?'} timed out); converged: {self.converged}"
            + (f" ({self.divergence})" if self.divergence else "")
            + (f"; stuck moves: {self.stuck_moves}" if self.stuck_moves else "")
        )


class Workload:
    """Concurrent clients on a small key set, recording every operation in a History."""

    def __init__(
        self, cluster: LocalCluster, clients: int, keys: int, op_timeout: float, seed: int
    ) -> None:
        self.cluster = cluster
        self.clients = clients
        self.keys = [f"k{i}".encode() for i in range(keys)]
        self.op_timeout = op_timeout
        self.rng = random.Random(seed)
        self.history = History()
        self.series_acked: dict[bytes, bytes] = {}
        self.stop = asyncio.Event()
        self._counter = 0

    def _value(self, client: int) -> bytes:
        self._counter += 1
        return f"c{client}-{self._counter}".encode()

    async def _client(self, index: int) -> None:
        rng = random.Random(self.rng.random())
        seen: dict[bytes, bytes] = {}
        # Half the clients know no leaders, as a plain gRPC client would: their requests land
        # on followers, which serve them through their leader over the Raft link.
        async with self.cluster.client(
            timeout=self.op_timeout,
            attempt_timeout=min(2.0, self.op_timeout),
            leader_aware=index % 2 == 0,
        ) as c:
            while not self.stop.is_set():
                key = rng.choice(self.keys)
                roll = rng.random()
                if roll < 0.4:
                    await self._get(c, index, key, seen)
                elif roll < 0.75:
                    await self._put(c, index, key)
                else:
                    await self._cas(c, index, key, seen.get(key))

    async def _get(self, c: Client, index: int, key: bytes, seen: dict[bytes, bytes]) -> None:
        h = self.history.invoke(index, "get", key)
        try:
            value = (await c.get(key)).value
        except KeyNotFound:
            self.history.complete(h, Outcome.OK, None)
            return
        except RaftKVError:
            self.history.complete(h, Outcome.UNKNOWN)
            return
        seen[key] = value
        self.history.complete(h, Outcome.OK, value)

    async def _put(self, c: Client, index: int, key: bytes) -> None:
        value = self._value(index)
        h = self.history.invoke(index, "put", key, value=value)
        try:
            await c.put(key, value)
        except InvalidArgument:
            self.history.complete(h, Outcome.FAILED)
            return
        except RaftKVError:
            self.history.complete(h, Outcome.UNKNOWN)
            return
        self.history.complete(h, Outcome.OK)

    async def _cas(self, c: Client, index: int, key: bytes, expected: bytes | None) -> None:
        if expected is None:
            expected = b"c0-0"  # a value never written: the swap must fail
        value = self._value(index)
        h = self.history.invoke(index, "cas", key, value=value, expected=expected)
        try:
            await c.compare_and_swap(key, value, expected_value=expected)
        except PreconditionFailed:
            self.history.complete(h, Outcome.OK, False)
            return
        except RaftKVError:
            self.history.complete(h, Outcome.UNKNOWN)
            return
        self.history.complete(h, Outcome.OK, True)

    async def _series(self) -> None:
        """An append-only series of unique keys: every acknowledged one must survive."""
        n = 0
        async with self.cluster.client(timeout=self.op_timeout) as c:
            while not self.stop.is_set():
                key, value = f"series-{n:06d}".encode(), f"v{n}".encode()
                n += 1
                try:
                    await c.put(key, value)
                except RaftKVError:
                    continue
                self.series_acked[key] = value

    async def run(self) -> None:
        await asyncio.gather(self._series(), *(self._client(i) for i in range(self.clients)))

    async def final_reads(self) -> list[bytes]:
        """Read every key once more (recorded) and return the acknowledged series keys lost."""
        async with self.cluster.client(timeout=30) as c:
            for key in self.keys:
                await self._get(c, 99, key, {})
            lost = []
            for key, value in sorted(self.series_acked.items()):
                try:
                    got = (await c.get(key)).value
                except KeyNotFound:
                    got = None
                if got != value:
                    lost.append(key)
            return lost


class Nemesis:
    """Injects faults into a LocalCluster, one at a time, and records them."""

    def __init__(self, cluster: LocalCluster, seed: int, partitioner: Partitioner | None) -> None:
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.partitioner = partitioner
        self.faults: list[Fault] = []
        self._joined = len(cluster.nodes)
        self._growing = True

    def kinds(self) -> list[str]:
        return [k for k in FAULT_KINDS if k != "partition" or self.partitioner is not None]

    def inject(self, kind: str) -> None:
        c = self.cluster
        if kind == "kill":
            node = c.busiest_leader()
            fault = Fault(kind, node, time.monotonic())
            c.kill(node)
            time.sleep(self.rng.uniform(0.5, 2.0))
            c.start_node(node)
        elif kind == "pause":
            node = self.rng.choice(list(c.nodes))
            fault = Fault(kind, node, time.monotonic())
            c.pause(node)
            time.sleep(self.rng.uniform(1.0, 3.0))
            c.resume(node)
        elif kind == "partition":
            assert self.partitioner is not None
            node = self.rng.choice([c.busiest_leader(), *c.nodes])
            fault = Fault(kind, node, time.monotonic())
            self.partitioner.cut(node)
            time.sleep(self.rng.uniform(1.0, 3.0))
            self.partitioner.heal()
        elif kind == "membership":
            fault = self._membership()
        else:
            fault = Fault(kind, "all", time.monotonic())
            c.kill_all()
            for node_id in c.nodes:
                c.start_node(node_id, wait=False)
            c.wait_healthy(30)
        fault.end = time.monotonic()
        self.faults.append(fault)
        log.info("fault %s on %s took %.1fs", kind, fault.node, fault.end - fault.start)

    def _membership(self) -> Fault:
        """Add a node or remove one, in turn: 3 → 4 → 5 → 4 → 3 → 4 ... nodes."""
        size = len(self.cluster.nodes)
        if size >= MAX_NODES:
            self._growing = False
        elif size <= MIN_NODES:
            self._growing = True
        return self._join() if self._growing else self._drain()

    def _join(self) -> Fault:
        c = self.cluster
        self._joined += 1
        new = f"n{self._joined}"
        fault = Fault("membership", f"+{new}", time.monotonic())
        c.add_node(new, host=f"127.0.0.{10 + self._joined}")
        try:
            wait_for(lambda: _settled(c, lambda ids: new in ids), MOVE_SETTLE_S, "moves")
        except TimeoutError as e:
            fault.stuck = f"the moves onto {new} did not finish: {e}"
        return fault

    def _drain(self) -> Fault:
        c = self.cluster
        victim = self.rng.choice(sorted(c.nodes))
        fault = Fault("membership", f"-{victim}", time.monotonic())
        ask = next(n for n in sorted(c.nodes) if n != victim)

        async def remove(dead: bool) -> None:
            async with c.client([c.endpoint(ask)], timeout=30) as client:
                await client.member_remove(victim, dead=dead)

        def gone(ids: list[str]) -> bool:
            return victim not in ids

        try:
            asyncio.run(remove(dead=False))
            wait_for(lambda: _settled(c, gone), MOVE_SETTLE_S, "drain")
        except (RaftKVError, TimeoutError) as e:
            # Recorded (the test fails on it), then the run goes on: the draining node dies
            # and is removed as dead, so the cluster keeps its size for the next faults.
            log.warning("membership: draining %s did not finish (%s); killing it, removing it "
                        "as dead", victim, e)  # fmt: skip
            fault.stuck = f"draining {victim} did not finish: {e}"
            c.forget_node(victim)
            with contextlib.suppress(RaftKVError, TimeoutError):
                asyncio.run(remove(dead=True))
                wait_for(lambda: _settled(c, gone), MOVE_SETTLE_S, "dead removal")
            return fault
        proc = c.nodes[victim].process
        try:
            if proc is not None:
                proc.wait(30)  # a removed node stops by itself
        except subprocess.TimeoutExpired:
            fault.stuck = f"{victim} was removed but did not stop within 30 s"
        c.forget_node(victim)
        return fault

    def run(self, count: int, deadline: float, stop: threading.Event) -> None:
        kinds = self.kinds()
        for i in range(count):
            if time.monotonic() > deadline or stop.is_set():
                break
            self.inject(kinds[i % len(kinds)])
            # let the cluster settle and serve between faults
            with contextlib.suppress(TimeoutError):
                self.cluster.wait_leaders(15)
            time.sleep(self.rng.uniform(0.3, 1.0))


def _settled(cluster: LocalCluster, members: Callable[[list[str]], bool]) -> bool:
    """No replica move in progress, and the members are as ``members`` wants."""
    node = next(n for n in cluster.nodes.values() if n.running and not n.paused).id
    status = cluster.status(node)
    return not status.moves and members([n.id for n in status.nodes])


def converged(cluster: LocalCluster) -> tuple[bool, str]:
    """Do all replicas of every shard have the same applied index and data digest?"""
    with cluster.dialer.sync_channel(cluster.running_endpoints()[0]) as ch:
        status = kv_grpc.ClusterStub(ch).Status(
            kv.StatusRequest(digest=True), timeout=15, metadata=cluster.metadata
        )
    for shard in status.shards:
        states = {(r.last_applied, r.digest) for r in shard.replica_status}
        if len(shard.replica_status) != len(shard.replicas) or len(states) != 1:
            detail = ", ".join(
                f"{r.node}@{r.last_applied}:{r.digest[:8]}" for r in shard.replica_status
            )
            return False, f"shard {shard.shard_id}: {detail}"
    return True, ""


@contextlib.contextmanager
def fault_cluster(
    base_dir: Path,
    nodes: int = 3,
    shards: int = 4,
    *,
    secure: bool = False,
    replicas: int = 3,
    extra_args: tuple[str, ...] = (),
) -> Iterator[LocalCluster]:
    """A cluster with one loopback address per node, ready for partitions."""
    with LocalCluster.create(
        base_dir,
        nodes=nodes,
        shards=shards,
        replicas=replicas,
        hosts=loopback_hosts(nodes),
        secure=secure,
        extra_args=extra_args,
    ) as cluster:
        cluster.start(timeout=60)
        yield cluster


def run(
    base_dir: Path,
    *,
    faults: int = 40,
    max_seconds: float = 420.0,
    clients: int = 8,
    keys: int = 8,
    seed: int | None = None,
    op_timeout: float = 1.5,
    secure: bool = False,
) -> RunReport:
    """One bounded nemesis run; returns the report (never raises on a failed check).

    ``secure`` runs the cluster with TLS on both ports, a cluster secret and tokens."""
    seed = seed if seed is not None else random.randrange(1 << 30)
    report = RunReport()
    log.info("nemesis run: seed %d, %d faults, %d clients, %d keys", seed, faults, clients, keys)
    usable, why = Partitioner.available()
    with fault_cluster(base_dir, secure=secure) as cluster:
        partitioner = Partitioner(cluster) if usable else None
        if partitioner is None:
            report.skipped_kinds["partition"] = why
        try:
            if partitioner is not None:
                partitioner.install()
            workload = Workload(cluster, clients, keys, op_timeout, seed)
            nemesis = Nemesis(cluster, seed, partitioner)
            stop = threading.Event()

            async def drive() -> None:
                load = asyncio.create_task(workload.run())
                try:
                    await asyncio.to_thread(
                        nemesis.run, faults, time.monotonic() + max_seconds, stop
                    )
                    await asyncio.sleep(1.0)
                finally:
                    stop.set()
                    workload.stop.set()
                    await asyncio.wait_for(load, 60)
                cluster.wait_leaders(30)
                report.lost_writes = await workload.final_reads()

            try:
                asyncio.run(drive())
            finally:
                if partitioner is not None:
                    partitioner.heal()
            report.faults = nemesis.faults
            ops = workload.history.operations()
            report.operations = len(ops)
            report.ok_operations = sum(o.outcome == Outcome.OK for o in ops)
            report.unknown_operations = sum(o.outcome == Outcome.UNKNOWN for o in ops)
            report.acknowledged_series = len(workload.series_acked)
            report.check = check(ops, timeout_s=120)
            report.history_path = base_dir / "history.jsonl"
            workload.history.to_jsonl(report.history_path)
            try:
                wait_for(lambda: converged(cluster)[0], 30, "replicas to converge")
                report.converged = True
            except TimeoutError:
                report.converged, report.divergence = converged(cluster)
        finally:
            if partitioner is not None:
                partitioner.remove()
    log.info("nemesis run done (seed %d): %s", seed, report.summary())
    return report


def main() -> None:
    """``python -m raftkv.testing.nemesis --faults 200``: a longer run from the shell."""
    import argparse
    import sys
    import tempfile

    ap = argparse.ArgumentParser(description="Run raftkv's fault injection under load.")
    ap.add_argument("--faults", type=int, default=200)
    ap.add_argument("--max-seconds", type=float, default=3600)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep cluster files and history here")
    ap.add_argument("--secure", action="store_true", help="TLS, a cluster secret and tokens")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = args.keep or Path(tempfile.mkdtemp(prefix="raftkv-nemesis-"))
    report = run(
        base, faults=args.faults, max_seconds=args.max_seconds, seed=args.seed, secure=args.secure
    )
    print(report.summary())
    if report.check is not None and not report.check.ok:
        print(report.check.describe())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
