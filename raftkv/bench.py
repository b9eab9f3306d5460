"""``raftkv bench``: a closed-loop load generator with HDR latency histograms (issue #4).

Why it exists: to say how fast raftkv is we need numbers that can be compared, run after run and
against other stores. So the generator is not tied to raftkv: it drives anything that implements
the small :class:`Target` protocol (put, get, compare-and-swap by version). raftkv's target wraps
the leader-aware :class:`~raftkv.client.Client` with its own timeouts and retries, exactly as an
application would use it; ``scripts/bench-etcd`` plugs in an etcd target and gets the same
measurement, the same percentiles and the same JSON.

How it measures:

- Each concurrency slot is a worker in a closed loop: one request in flight, the next one sent
  when the previous one answered. The total concurrency is split evenly over ``procs`` client
  processes (started with ``spawn``), because one Python client process saturates one core long
  before a server does.
- Every process first preloads its share of the key space (for reads and CAS), then all of them
  start together at one wall-clock instant: ``warmup`` seconds that are not recorded, then
  ``duration`` seconds that are. An operation counts when it *completes* inside the recorded
  window; operations still in flight when the window closes are cancelled and not counted.
- Latency goes into an HDR histogram (microseconds, 1 µs .. 60 s, 3 significant digits) per
  operation kind; the processes send theirs back encoded and the parent adds them up.
- Errors are counted by gRPC status code name and kept out of ``ops`` and the latency histogram.
  One ``cas`` operation is a read of the key's version then a compare-and-swap on it, timed
  together; a swap that finds the version changed (FAILED_PRECONDITION) is a *conflict*, counted
  apart and not an error. A get of an absent key is a *miss*. Conflicts and misses are answers,
  so they count in ``ops`` and in the latencies.
- Client CPU is each client process's user+system time over the recorded window (``os.times``),
  summed; divided by ops it says what one request costs the client. If the caller can read the
  servers' CPU (``server_cpu``), the same is reported for the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import multiprocessing
import os
import random
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from hdrh.histogram import HdrHistogram

if TYPE_CHECKING:
    from raftkv.network import ClientTLS

# Histogram range and precision: microseconds from 1 µs to 60 s, 3 significant digits.
HIST_MIN_US = 1
HIST_MAX_US = 60_000_000
HIST_DIGITS = 3
PERCENTILES = {"p50_ms": 50.0, "p90_ms": 90.0, "p99_ms": 99.0, "p999_ms": 99.9}


class BenchError(Exception):
    """The benchmark could not run (bad options, a client process failed, a timeout)."""


class Workload(StrEnum):
    put = "put"
    get = "get"
    mixed = "mixed"
    cas = "cas"


class Consistency(StrEnum):
    linearizable = "linearizable"
    stale = "stale"


# -- targets ---------------------------------------------------------------------------------


class Target(Protocol):
    """What the load generator drives. One instance per client process, shared by its workers.

    Methods raise on failure; :func:`error_code` names the failure (a gRPC status code name for
    gRPC errors). They are called from one event loop, concurrently.
    """

    async def put(self, key: bytes, value: bytes) -> None: ...

    async def get(self, key: bytes) -> int | None:
        """The key's version, or None if the key is absent (a miss, not an error)."""
        ...

    async def cas(self, key: bytes, value: bytes, expected_version: int) -> bool:
        """Swap if the version matches (0 = absent). False on a mismatch (a conflict)."""
        ...

    async def close(self) -> None: ...


# Builds a Target inside a client process. It is pickled to each spawned process, so it must be
# a module-level class instance or function (a frozen dataclass with a ``__call__`` works well).
TargetFactory = Callable[[], Target]


def error_code(exc: BaseException) -> str:
    """The name under which an error is counted: its gRPC status code name when it has one."""
    from raftkv.errors import RaftKVError, status_for

    if isinstance(exc, RaftKVError):
        return status_for(exc).name
    code = getattr(exc, "code", None)
    if callable(code):
        with contextlib.suppress(Exception):
            value = code()
            name = getattr(value, "name", None)
            if isinstance(name, str):
                return name
    if isinstance(exc, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return type(exc).__name__


class RaftKVTarget:
    """raftkv through its own leader-aware :class:`~raftkv.client.Client` (default timeouts)."""

    def __init__(
        self,
        endpoints: str,
        stale: bool = False,
        batching: bool = True,
        tls: ClientTLS | None = None,
        token: str | None = None,
    ) -> None:
        from raftkv.client import Client

        self.client = Client(endpoints, batching=batching, tls=tls, token=token)
        self.stale = stale

    async def put(self, key: bytes, value: bytes) -> None:
        await self.client.put(key, value)

    async def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        await self.client.put_many(items)

    async def get(self, key: bytes) -> int | None:
        from raftkv.errors import KeyNotFound

        try:
            return (await self.client.get(key, stale=self.stale)).version
        except KeyNotFound:
            return None

    async def cas(self, key: bytes, value: bytes, expected_version: int) -> bool:
        from raftkv.errors import PreconditionFailed

        try:
            await self.client.compare_and_swap(key, value, expected_version=expected_version)
        except PreconditionFailed:
            return False
        return True

    async def close(self) -> None:
        await self.client.close()


class PlainTarget:
    """raftkv as any gRPC client sees it (grpcurl, a Go or Java stub): one RPC per operation
    to the next node in turn, no leader awareness, no batching, no retries. A node that does
    not lead the key's shard forwards the request; this is the load issue #9 measures."""

    def __init__(
        self, endpoints: str, stale: bool, tls: ClientTLS | None, token: str | None
    ) -> None:
        from raftkv._pb.raftkv.v1 import kv_pb2, kv_pb2_grpc
        from raftkv.client import parse_endpoints
        from raftkv.network import Dialer

        self.pb = kv_pb2
        dialer = Dialer(tls, token)
        self.metadata = dialer.metadata
        self.channels = [dialer.channel(ep) for ep in parse_endpoints(endpoints)]
        self._stubs = itertools.cycle([kv_pb2_grpc.KVStub(ch) for ch in self.channels])
        self.consistency = kv_pb2.STALE if stale else kv_pb2.LINEARIZABLE
        self.timeout = 5.0

    async def put(self, key: bytes, value: bytes) -> None:
        request = self.pb.PutRequest(key=key, value=value)
        await next(self._stubs).Put(request, timeout=self.timeout, metadata=self.metadata)

    async def get(self, key: bytes) -> int | None:
        request = self.pb.GetRequest(key=key, consistency=self.consistency)
        try:
            reply = await next(self._stubs).Get(
                request, timeout=self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return int(reply.version)

    async def cas(self, key: bytes, value: bytes, expected_version: int) -> bool:
        request = self.pb.CompareAndSwapRequest(
            key=key, value=value, expected_version=expected_version
        )
        try:
            await next(self._stubs).CompareAndSwap(
                request, timeout=self.timeout, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                return False
            raise
        return True

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)


@dataclass(frozen=True)
class PlainTargetFactory:
    endpoints: str
    stale: bool = False
    tls: ClientTLS | None = None
    token: str | None = None

    def __call__(self) -> PlainTarget:
        return PlainTarget(self.endpoints, self.stale, self.tls, self.token)


@dataclass(frozen=True)
class RaftKVTargetFactory:
    endpoints: str
    stale: bool = False
    batching: bool = True
    tls: ClientTLS | None = None
    token: str | None = None

    def __call__(self) -> RaftKVTarget:
        return RaftKVTarget(self.endpoints, self.stale, self.batching, self.tls, self.token)


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    workload: Workload = Workload.put
    keys: int = 10_000
    key_size: int = 16
    value_size: int = 100
    concurrency: int = 16
    duration: float = 10.0
    warmup: float = 1.0
    procs: int = 1
    read_ratio: float = 0.5
    preload: bool = True
    # put only: keys per request through the bulk API (PutMany); 1 = single puts.
    batch: int = 1
    # How long the client processes may take to start and preload before giving up.
    ready_timeout: float = 600.0

    def validate(self) -> None:
        if self.keys < 1:
            raise BenchError("--keys must be at least 1")
        if len(str(self.keys - 1)) + 1 > self.key_size:
            raise BenchError(f"--key-size {self.key_size} is too small for {self.keys} keys")
        if self.value_size < 0:
            raise BenchError("--value-size must be >= 0")
        if self.procs < 1:
            raise BenchError("--procs must be at least 1")
        if self.concurrency < self.procs:
            raise BenchError("--concurrency must be at least --procs (one worker per process)")
        if self.duration <= 0 or self.warmup < 0:
            raise BenchError("--duration must be > 0 and --warmup >= 0")
        if not 0.0 <= self.read_ratio <= 1.0:
            raise BenchError("--read-ratio must be between 0 and 1")
        if self.batch < 1 or (self.batch > 1 and self.workload != Workload.put):
            raise BenchError("--batch must be >= 1, and > 1 only with the put workload")

    @property
    def needs_preload(self) -> bool:
        return self.preload and self.workload != Workload.put


def key_name(i: int, key_size: int) -> bytes:
    """Key ``i`` of the key space, exactly ``key_size`` bytes: ``k000...0042``."""
    return b"k" + str(i).encode().rjust(key_size - 1, b"0")


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- recording -------------------------------------------------------------------------------


def new_histogram() -> Any:
    return HdrHistogram(HIST_MIN_US, HIST_MAX_US, HIST_DIGITS)


def record_us(hist: Any, seconds: float) -> None:
    """Record a latency in microseconds, clamped into the histogram's range."""
    hist.record_value(min(max(round(seconds * 1e6), HIST_MIN_US), HIST_MAX_US))


@dataclass
class Recorder:
    """What one client process measured inside the recorded window."""

    hists: dict[str, Any] = field(default_factory=dict)  # op kind → HdrHistogram
    errors: Counter[str] = field(default_factory=Counter)
    conflicts: int = 0
    misses: int = 0
    cpu_s: float = 0.0
    completed: int = 0  # every completion, warmup included (for the progress bar)

    def record(self, kind: str, seconds: float) -> None:
        hist = self.hists.get(kind)
        if hist is None:
            hist = self.hists[kind] = new_histogram()
        record_us(hist, seconds)

    def to_wire(self) -> dict[str, Any]:
        return {
            "hists": {k: h.encode() for k, h in self.hists.items()},
            "errors": dict(self.errors),
            "conflicts": self.conflicts,
            "misses": self.misses,
            "cpu_s": self.cpu_s,
        }


@dataclass
class Merged:
    hists: dict[str, Any] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    conflicts: int = 0
    misses: int = 0
    cpu_s: float = 0.0

    def add(self, wire: dict[str, Any]) -> None:
        for kind, encoded in wire["hists"].items():
            hist = self.hists.get(kind)
            if hist is None:
                hist = self.hists[kind] = new_histogram()
            hist.decode_and_add(encoded)
        self.errors.update(wire["errors"])
        self.conflicts += int(wire["conflicts"])
        self.misses += int(wire["misses"])
        self.cpu_s += float(wire["cpu_s"])

    def total(self) -> Any:
        total = new_histogram()
        for hist in self.hists.values():
            total.add(hist)
        return total


def latency_ms(hist: Any) -> dict[str, float]:
    """Percentiles (and mean, max) of a µs histogram, in milliseconds."""
    out = {name: int(hist.get_value_at_percentile(p)) / 1000.0 for name, p in PERCENTILES.items()}
    count = int(hist.get_total_count())
    out["mean_ms"] = round(float(hist.get_mean_value()) / 1000.0, 3) if count else 0.0
    out["max_ms"] = int(hist.get_max_value()) / 1000.0 if count else 0.0
    return out


def summarize(
    merged: Merged,
    config: BenchConfig,
    *,
    server_cpu_s: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The result as one flat JSON-able dict (see the module docstring for the definitions)."""
    total = merged.total()
    ops = int(total.get_total_count())
    duration = config.duration
    out: dict[str, Any] = {
        "workload": str(config.workload),
        "ops": ops,
        "duration_s": duration,
        "ops_per_s": round(ops / duration, 1) if duration > 0 else 0.0,
        **latency_ms(total),
        "errors": dict(sorted(merged.errors.items())),
        "error_count": sum(merged.errors.values()),
        "conflicts": merged.conflicts,
        "misses": merged.misses,
        "concurrency": config.concurrency,
        "procs": config.procs,
        "keys": config.keys,
        "key_size": config.key_size,
        "value_size": config.value_size,
        "warmup_s": config.warmup,
        "client_cpu_s": round(merged.cpu_s, 3),
        "client_cpu_us_per_op": round(merged.cpu_s * 1e6 / ops, 1) if ops else 0.0,
    }
    if config.workload == Workload.mixed:
        out["read_ratio"] = config.read_ratio
    if config.batch > 1:
        out["batch"] = config.batch
        out["keys_per_s"] = round(ops * config.batch / duration, 1) if duration > 0 else 0.0
    if len(merged.hists) > 1 or config.workload == Workload.cas:
        out["by_op"] = {
            kind: {"ops": int(h.get_total_count()), **latency_ms(h)}
            for kind, h in sorted(merged.hists.items())
        }
    if server_cpu_s is not None:
        out["server_cpu_s"] = round(server_cpu_s, 3)
        out["server_cpu_us_per_op"] = round(server_cpu_s * 1e6 / ops, 1) if ops else 0.0
    out.update(extra or {})
    return out


def render_text(summary: dict[str, Any]) -> str:
    """A short human-readable report of a :func:`summarize` result."""
    s = summary
    lines = [
        f"workload {s['workload']}: {s['ops']} ops in {s['duration_s']:g} s = "
        f"{s['ops_per_s']:,.1f} ops/s  (concurrency {s['concurrency']}, procs {s['procs']})",
        f"latency ms: p50 {s['p50_ms']:.3f}  p90 {s['p90_ms']:.3f}  p99 {s['p99_ms']:.3f}  "
        f"p99.9 {s['p999_ms']:.3f}  max {s['max_ms']:.3f}",
    ]
    for kind, o in s.get("by_op", {}).items():
        lines.append(
            f"  {kind:<5} {o['ops']} ops  p50 {o['p50_ms']:.3f}  p99 {o['p99_ms']:.3f}  "
            f"p99.9 {o['p999_ms']:.3f}"
        )
    errors = ", ".join(f"{k}={v}" for k, v in s["errors"].items()) or "none"
    lines.append(f"errors: {errors}   conflicts: {s['conflicts']}   misses: {s['misses']}")
    lines.append(f"client CPU: {s['client_cpu_s']:.2f} s = {s['client_cpu_us_per_op']:.1f} µs/op")
    if "server_cpu_s" in s:
        lines.append(
            f"server CPU: {s['server_cpu_s']:.2f} s = {s['server_cpu_us_per_op']:.1f} µs/op"
        )
    return "\n".join(lines)


def proc_cpu_seconds(pids: Sequence[int]) -> float:
    """user+system CPU seconds of running processes, from ``/proc/<pid>/stat`` (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may contain spaces: split after its closing paren.
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / ticks


# -- the client process ----------------------------------------------------------------------


def _cpu_now() -> float:
    t = os.times()
    return t.user + t.system


async def _one_op(
    target: Target, config: BenchConfig, rng: random.Random, value: bytes
) -> tuple[str, str]:
    """Run one operation; returns (op kind, outcome: "ok" | "conflict" | "miss")."""
    key = key_name(rng.randrange(config.keys), config.key_size)
    workload = config.workload
    if workload == Workload.mixed:
        workload = Workload.get if rng.random() < config.read_ratio else Workload.put
    if workload == Workload.put and config.batch > 1:
        put_many = getattr(target, "put_many", None)
        if put_many is None:
            raise BenchError("this target has no bulk put")
        keys = [key_name(rng.randrange(config.keys), config.key_size) for _ in range(config.batch)]
        await put_many([(k, value) for k in keys])
        return "put", "ok"
    if workload == Workload.put:
        await target.put(key, value)
        return "put", "ok"
    if workload == Workload.get:
        return "get", ("ok" if await target.get(key) is not None else "miss")
    version = await target.get(key)
    swapped = await target.cas(key, value, version or 0)
    return "cas", ("ok" if swapped else "conflict")


async def _worker(
    target: Target,
    config: BenchConfig,
    rec: Recorder,
    seed: int,
    value: bytes,
    window: tuple[float, float],
) -> None:
    rng = random.Random(seed)
    start, end = window
    clock = time.monotonic
    while True:
        t0 = clock()
        if t0 >= end:
            return
        try:
            kind, outcome = await _one_op(target, config, rng, value)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            t1 = clock()
            rec.completed += 1
            if start <= t1 < end:
                rec.errors[error_code(e)] += 1
            continue
        t1 = clock()
        rec.completed += 1
        if start <= t1 < end:
            rec.record(kind, t1 - t0)
            if outcome == "conflict":
                rec.conflicts += 1
            elif outcome == "miss":
                rec.misses += 1


async def _preload(
    target: Target, config: BenchConfig, index: int, workers: int, value: bytes, progress: Any
) -> None:
    """Write this process's share of the key space (every procs-th key), ``workers`` at once."""
    todo = iter(range(index, config.keys, config.procs))

    async def loader() -> None:
        for i in todo:
            key = key_name(i, config.key_size)
            try:
                await target.put(key, value)
            except Exception as e:
                raise BenchError(f"preload of {key!r} failed: {error_code(e)}: {e}") from e
            progress[index] += 1

    await asyncio.gather(*(loader() for _ in range(max(1, workers))))


async def _process_main(
    index: int,
    config: BenchConfig,
    workers: int,
    factory: TargetFactory,
    conn: Connection,
    progress: Any,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    target = factory()
    value = os.urandom(config.value_size)
    rec = Recorder()
    try:
        if config.needs_preload:
            await _preload(target, config, index, workers, value, progress)
        conn.send(("ready", None))
        start_wall = await loop.run_in_executor(None, conn.recv)
        if start_wall is None:  # the parent gave up
            return rec.to_wire()
        begin = time.monotonic() + (float(start_wall) - time.time())
        window = (begin + config.warmup, begin + config.warmup + config.duration)

        async def counter() -> None:
            while True:
                progress[index] = rec.completed
                await asyncio.sleep(0.2)

        async def cpu_clock() -> None:
            await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
            cpu0 = _cpu_now()
            await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
            rec.cpu_s = _cpu_now() - cpu0

        progress[index] = 0
        await asyncio.sleep(max(0.0, begin - time.monotonic()))
        seed = random.randrange(1 << 62)
        tasks = [
            asyncio.ensure_future(_worker(target, config, rec, seed + w, value, window))
            for w in range(workers)
        ]
        tasks.append(asyncio.ensure_future(counter()))
        await cpu_clock()  # returns when the window closes
        for t in tasks:  # whatever is still in flight does not count: cancel it
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress[index] = rec.completed
        return rec.to_wire()
    finally:
        with contextlib.suppress(Exception):
            await target.close()


def _process_entry(
    index: int,
    config: BenchConfig,
    workers: int,
    factory: TargetFactory,
    conn: Connection,
    progress: Any,
) -> None:
    """Entry point of one spawned client process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        import uvloop

        result = uvloop.run(_process_main(index, config, workers, factory, conn, progress))
        conn.send(("result", result))
    except BenchError as e:  # an expected failure: one line is enough
        with contextlib.suppress(Exception):
            conn.send(("failed", str(e)))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("failed", traceback.format_exc()))
    finally:
        conn.close()


# -- the parent ------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar on stderr; a no-op when disabled or when stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.bar: Any = None
        self.task: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self.bar = Progress(
            TextColumn("{task.description:<8}"),
            BarColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=True,
        )

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def show(self, phase: str, done: float, total: float, info: str) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.task = self.bar.add_task(phase, total=total, info=info)
        self.bar.update(self.task, description=phase, completed=done, total=total, info=info)


def run(
    config: BenchConfig,
    factory: TargetFactory,
    *,
    progress: bool = True,
    server_cpu: Callable[[], float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one benchmark in ``config.procs`` spawned client processes; returns the summary.

    ``factory`` builds the :class:`Target` in each client process (it is pickled there).
    ``server_cpu``, if given, returns the servers' total CPU seconds so far; it is sampled at
    the start and the end of the recorded window. ``extra`` is merged into the summary.
    """
    config.validate()
    ctx = multiprocessing.get_context("spawn")
    counts = ctx.RawArray("q", config.procs)
    conns: list[Connection] = []
    procs: list[Any] = []
    done = False
    try:
        with _Progress(progress) as bar:
            for i, workers in enumerate(split_evenly(config.concurrency, config.procs)):
                parent_end, child_end = ctx.Pipe()
                p = ctx.Process(
                    target=_process_entry,
                    args=(i, config, workers, factory, child_end, counts),
                    name=f"raftkv-bench-{i}",
                    daemon=True,
                )
                p.start()
                child_end.close()
                conns.append(parent_end)
                procs.append(p)

            def preload_progress() -> None:
                if config.needs_preload:
                    n = sum(counts)
                    bar.show("preload", n, config.keys, f"{n}/{config.keys} keys")

            _collect(conns, procs, "ready", config.ready_timeout, preload_progress)
            start_wall = time.time() + 0.2
            for c in conns:
                c.send(start_wall)
            server_cpu_s = _watch(config, start_wall, counts, bar, server_cpu)
        # In-flight requests are cancelled when the window closes; this is only a safety net.
        results = _collect(conns, procs, "result", 30.0)
        done = True
    finally:
        for p in procs:
            if done:
                p.join(5)
            if p.is_alive():  # failed, interrupted, or stuck: stop it now
                p.terminate()
                p.join(5)
        for c in conns:
            c.close()
    merged = Merged()
    for r in results:
        merged.add(r)
    return summarize(merged, config, server_cpu_s=server_cpu_s, extra=extra)


def _collect(
    conns: list[Connection],
    procs: list[Any],
    kind: str,
    timeout: float,
    tick: Callable[[], None] | None = None,
) -> list[Any]:
    """Wait for message ``kind`` from every process, in order; fail fast on any failure."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(conns):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for client processes")
        pending = [c for i, c in enumerate(conns) if i not in got]
        for ready in wait_connections(pending, timeout=min(left, 0.25)):
            assert isinstance(ready, Connection)
            i = conns.index(ready)
            try:
                tag, payload = ready.recv()
            except EOFError:
                procs[i].join(1)
                code = procs[i].exitcode
                raise BenchError(f"client process {i} exited (code {code})") from None
            if tag == "failed":
                raise BenchError(f"client process {i}: {payload}")
            if tag != kind:
                raise BenchError(f"client process {i} sent {tag!r}, expected {kind!r}")
            got[i] = payload
        if tick is not None:
            tick()
    return [got[i] for i in range(len(conns))]


def _watch(
    config: BenchConfig,
    start_wall: float,
    counts: Any,
    bar: _Progress,
    server_cpu: Callable[[], float] | None,
) -> float | None:
    """Show progress until the window closes; sample the servers' CPU at its edges."""
    total = config.warmup + config.duration
    window_start = start_wall + config.warmup
    window_end = window_start + config.duration
    cpu0: float | None = None
    cpu_s: float | None = None
    last_n, last_t = 0, time.time()
    while True:
        now = time.time()
        if server_cpu is not None and cpu0 is None and now >= window_start:
            cpu0 = server_cpu()
        if now >= window_end:
            if server_cpu is not None and cpu0 is not None:
                cpu_s = server_cpu() - cpu0
            return cpu_s
        n = sum(counts)
        rate = (n - last_n) / (now - last_t) if now > last_t and n >= last_n else 0.0
        last_n, last_t = n, now
        phase = "warmup" if now < window_start else "measure"
        bar.show(phase, max(0.0, now - start_wall), total, f"{rate:,.0f} ops/s")
        next_edge = window_start if now < window_start else window_end
        time.sleep(max(0.0, min(0.25, next_edge - now)))


# -- CLI glue --------------------------------------------------------------------------------


def run_cli(
    config: BenchConfig,
    *,
    endpoints: str,
    consistency: Consistency,
    as_json: bool,
    server_pids: Sequence[int] = (),
    batching: bool = True,
    tls: ClientTLS | None = None,
    token: str | None = None,
    plain: bool = False,
) -> dict[str, Any]:
    """What ``raftkv bench`` does: run against raftkv and print text, or one JSON object.

    ``plain``: drive it as a plain gRPC client would (see :class:`PlainTarget`)."""
    stale = consistency == Consistency.stale
    factory: TargetFactory = (
        PlainTargetFactory(endpoints, stale, tls, token)
        if plain
        else RaftKVTargetFactory(endpoints, stale=stale, batching=batching, tls=tls, token=token)
    )
    server_cpu = (lambda: proc_cpu_seconds(server_pids)) if server_pids else None
    summary = run(
        config,
        factory,
        progress=not as_json,
        server_cpu=server_cpu,
        extra={
            "target": "raftkv-plain" if plain else "raftkv",
            "consistency": str(consistency),
            "endpoints": endpoints,
        },
    )
    print(json.dumps(summary) if as_json else render_text(summary), flush=True)
    return summary


__all__ = [
    "BenchConfig",
    "BenchError",
    "Consistency",
    "PlainTarget",
    "PlainTargetFactory",
    "RaftKVTarget",
    "RaftKVTargetFactory",
    "Target",
    "TargetFactory",
    "Workload",
    "error_code",
    "key_name",
    "proc_cpu_seconds",
    "render_text",
    "run",
    "run_cli",
    "summarize",
]
