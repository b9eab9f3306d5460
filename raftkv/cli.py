"""The ``raftkv`` command line: serve a node, talk to a cluster, run a local cluster.

Commands map one-to-one onto the library: ``serve`` builds a :class:`~raftkv.node.Node` and runs
:func:`~raftkv.server.serve`; ``client ...`` uses :class:`~raftkv.client.Client`; ``local up``
uses :class:`~raftkv.testing.cluster.LocalCluster`. Errors print one line on stderr with the
reason (and the leader hint when there is one) and exit non-zero; they never print a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import os
import signal
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv.client import DEFAULT_ENDPOINT, Client
from raftkv.config import ClusterConfig, ConfigError, NodeSettings, RaftTuning
from raftkv.errors import KeyNotFound, RaftKVError, Unavailable

app = typer.Typer(
    help="raftkv: a sharded, Raft-replicated key-value store with a gRPC API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
client_app = typer.Typer(
    help="Talk to a running cluster: put, get, delete, cas, status.", no_args_is_help=True
)
local_app = typer.Typer(help="Run a whole cluster of local processes.", no_args_is_help=True)
app.add_typer(client_app, name="client")
app.add_typer(local_app, name="local")

EXIT_NOT_FOUND = 1
EXIT_ERROR = 2


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def configure_logging(node_id: str, log_dir: Path, level: str) -> Path:
    """Log to ``<log_dir>/<node-id>/raftkv.log`` (rotated) and to stderr."""
    path = log_dir / node_id / "raftkv.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(
        f"%(asctime)s %(levelname)s {node_id} %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    root = logging.getLogger()
    root.setLevel(level.upper())
    file_handler = logging.handlers.RotatingFileHandler(path, maxBytes=50 << 20, backupCount=3)
    stream = logging.StreamHandler(sys.stderr)
    for h in (file_handler, stream):
        h.setFormatter(fmt)
        root.addHandler(h)
    # pysyncobj logs routine reconnects at WARNING; ours say what matters.
    logging.getLogger("pysyncobj").setLevel(logging.ERROR)
    return path


# Set by LocalCluster for the nodes it starts: a test or `local up` that dies, even by
# SIGKILL, must not leave node processes behind.
DIE_WITH_PARENT_ENV = "RAFTKV_DIE_WITH_PARENT"


def _die_with_parent() -> None:
    """Stop (SIGTERM to ourselves) as soon as the process that started us is gone.

    Polls the parent pid from a daemon thread; prctl(PR_SET_PDEATHSIG) would be simpler but
    fires when the *thread* that spawned us exits, and test helpers spawn from worker threads.
    """
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@app.command()
def serve(
    cluster: Annotated[
        Path | None,
        typer.Option(
            "--cluster",
            "-c",
            help="Cluster TOML file shared by every node. Omit it for a single-node cluster "
            "on 127.0.0.1:7001.",
        ),
    ] = None,
    node_id: Annotated[
        str, typer.Option("--id", help="This node's id: a [nodes.<id>] table of the cluster file.")
    ] = "n1",
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", "-d", help="Where journals and snapshots live. [default: ./data/<id>]"
        ),
    ] = None,
    log_dir: Annotated[
        Path, typer.Option("--log-dir", help="Logs go to LOG_DIR/<id>/raftkv.log.")
    ] = Path("logs"),
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
    leader_wait: Annotated[
        float,
        typer.Option(
            help="Seconds a request waits for a shard to elect a leader before UNAVAILABLE."
        ),
    ] = 3.0,
    proposal_timeout: Annotated[
        float, typer.Option(help="Seconds a write (or read barrier) may take to commit.")
    ] = 5.0,
    fsync: Annotated[
        bool,
        typer.Option(
            help="fsync the journal before an entry counts toward a commit (one fsync per "
            "batch of entries), so acknowledged writes survive power loss. Off: they survive "
            "process crashes only (the page cache holds them)."
        ),
    ] = False,
) -> None:
    """Run one node: its shard replicas, one Raft port and one gRPC port.

    Every node of a cluster is started with the same --cluster file and its own --id.
    The node answers any key: it serves shards it leads and forwards the rest, one hop,
    to the leader's node.
    """
    try:
        config = ClusterConfig.load(cluster) if cluster else ClusterConfig.single_node()
        config.node(node_id)
    except ConfigError as e:
        raise fail(str(e)) from None
    settings = NodeSettings(
        node_id=node_id,
        data_dir=data_dir or Path("data") / node_id,
        log_dir=log_dir,
        leader_wait_s=leader_wait,
        proposal_timeout_s=proposal_timeout,
        raft=RaftTuning(fsync=fsync),
    )
    if os.environ.get(DIE_WITH_PARENT_ENV) == "1":
        _die_with_parent()
    path = configure_logging(node_id, log_dir, log_level)
    log = logging.getLogger("raftkv.cli")
    log.info("starting node %s (data %s, log %s)", node_id, settings.data_dir, path)

    import uvloop

    from raftkv.node import Node
    from raftkv.server import serve as run_server
    from raftkv.transport import RaftBindError

    try:
        node = Node(config, settings)
        uvloop.run(run_server(node))
    except (RaftKVError, RaftBindError) as e:
        log.error("%s", e)
        raise fail(str(e)) from None


# -- client ---------------------------------------------------------------------------------


class Output(StrEnum):
    table = "table"
    json = "json"


_client_opts: dict[str, Any] = {}


@client_app.callback()
def client_main(
    endpoints: Annotated[
        str,
        typer.Option(
            "--endpoints",
            "-e",
            envvar="RAFTKV_ENDPOINTS",
            help="Comma-separated host:port gRPC endpoints of any nodes.",
        ),
    ] = DEFAULT_ENDPOINT,
    timeout: Annotated[
        float, typer.Option(help="Overall deadline in seconds, retries included.")
    ] = 10.0,
) -> None:
    """Options shared by every client command."""
    _client_opts.update(endpoints=endpoints, timeout=timeout)


def _run(coro_fn: Any) -> Any:
    async def main() -> Any:
        async with Client(
            _client_opts.get("endpoints", DEFAULT_ENDPOINT),
            timeout=_client_opts.get("timeout", 10.0),
            attempt_timeout=min(5.0, _client_opts.get("timeout", 10.0)),
        ) as c:
            return await coro_fn(c)

    try:
        return asyncio.run(main())
    except KeyNotFound as e:
        raise fail(str(e), EXIT_NOT_FOUND) from None
    except Unavailable as e:
        hint = f" (leader hint: {e.leader} at {e.leader_endpoint})" if e.leader else ""
        raise fail(f"unavailable: {e}{hint}") from None
    except RaftKVError as e:
        raise fail(f"{type(e).__name__}: {e}") from None
    except ValueError as e:
        raise fail(str(e)) from None


def _read_value(value: str) -> bytes:
    return sys.stdin.buffer.read() if value == "-" else value.encode()


@client_app.command()
def put(
    key: Annotated[str, typer.Argument(help="The key (UTF-8).")],
    value: Annotated[str, typer.Argument(help="The value; '-' reads it from stdin.")],
) -> None:
    """Store VALUE under KEY. Prints the key's new version."""
    data = _read_value(value)
    version = _run(lambda c: c.put(key.encode(), data))
    typer.echo(f"OK version={version}")


@client_app.command()
def get(
    key: Annotated[str, typer.Argument(help="The key (UTF-8).")],
    stale: Annotated[
        bool, typer.Option(help="Read any replica's local copy (may be stale; no quorum needed).")
    ] = False,
) -> None:
    """Print the value of KEY on stdout. A missing key exits 1 with a message on stderr."""
    result = _run(lambda c: c.get(key.encode(), stale=stale))
    sys.stdout.buffer.write(result.value)
    if sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


@client_app.command()
def delete(key: Annotated[str, typer.Argument(help="The key (UTF-8).")]) -> None:
    """Delete KEY. Succeeds whether or not it existed."""
    existed = _run(lambda c: c.delete(key.encode()))
    typer.echo("deleted" if existed else "not found (nothing to delete)")


@client_app.command()
def cas(
    key: Annotated[str, typer.Argument(help="The key (UTF-8).")],
    value: Annotated[str, typer.Argument(help="The new value; '-' reads it from stdin.")],
    expected: Annotated[
        str | None, typer.Option(help="Swap only if the current value equals this.")
    ] = None,
    expected_version: Annotated[
        int | None, typer.Option(help="Swap only if the current version equals this (0 = absent).")
    ] = None,
) -> None:
    """Compare-and-swap: set KEY to VALUE only if it currently matches. Exits 2 on mismatch."""
    if (expected is None) == (expected_version is None):
        raise fail("give exactly one of --expected or --expected-version")
    data = _read_value(value)
    version = _run(
        lambda c: c.compare_and_swap(
            key.encode(),
            data,
            expected_value=expected.encode() if expected is not None else None,
            expected_version=expected_version,
        )
    )
    typer.echo(f"OK version={version}")


def status_dict(s: kv.StatusResponse) -> dict[str, Any]:
    return {
        "node": s.node,
        "cluster_fingerprint": s.cluster_fingerprint,
        "shard_count": s.shard_count,
        "nodes": [
            {"id": n.id, "grpc": n.grpc, "raft": n.raft, "reachable": n.reachable} for n in s.nodes
        ],
        "shards": [
            {
                "shard": sh.shard_id,
                "replicas": list(sh.replicas),
                "leader": sh.leader or None,
                "term": sh.term,
                "commit_index": sh.commit_index,
                "replica_status": [
                    {
                        "node": r.node,
                        "role": r.role,
                        "term": r.term,
                        "commit_index": r.commit_index,
                        "last_applied": r.last_applied,
                        "keys": r.keys,
                    }
                    for r in sh.replica_status
                ],
            }
            for sh in s.shards
        ],
    }


def render_status(s: kv.StatusResponse) -> str:
    lines = [
        "NODE  GRPC                  RAFT                  UP",
    ]
    for n in s.nodes:
        lines.append(f"{n.id:<5} {n.grpc:<21} {n.raft:<21} {'yes' if n.reachable else 'NO'}")
    lines += ["", "SHARD  REPLICAS          LEADER  TERM  COMMIT  REPLICA COMMIT INDEXES"]
    for sh in s.shards:
        per = " ".join(f"{r.node}={r.commit_index}" for r in sh.replica_status)
        lines.append(
            f"{sh.shard_id:<6} {','.join(sh.replicas):<17} {sh.leader or '-':<7} "
            f"{sh.term:<5} {sh.commit_index:<7} {per}"
        )
    return "\n".join(lines)


@client_app.command()
def status(
    output: Annotated[Output, typer.Option("--output", "-o", help="table or json.")] = Output.table,
) -> None:
    """Show the nodes and, per shard: replicas, leader, term and commit index."""
    s = _run(lambda c: c.status())
    typer.echo(json.dumps(status_dict(s), indent=2) if output == Output.json else render_status(s))


# -- local cluster ---------------------------------------------------------------------------


@local_app.command("up")
def local_up(
    nodes: Annotated[int, typer.Option(help="How many nodes.")] = 3,
    shards: Annotated[int, typer.Option(help="How many shards (Raft groups).")] = 8,
    replicas: Annotated[int, typer.Option(help="Replicas per shard.")] = 3,
    base_port: Annotated[
        int, typer.Option(help="gRPC ports are BASE.., Raft ports BASE+100..")
    ] = 7001,
    directory: Annotated[
        Path, typer.Option("--dir", help="Cluster file, data and logs go here.")
    ] = Path(".raftkv-local"),
) -> None:
    """Start a local cluster of real `raftkv serve` processes; Ctrl-C stops them all."""
    from raftkv.testing.cluster import LocalCluster

    try:
        config = ClusterConfig.local(nodes, shards, replicas, base_port)
    except ConfigError as e:
        raise fail(str(e)) from None
    cluster = LocalCluster(config, directory)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    # Handle both explicitly: a SIGINT inherited as ignored (a background job) must still stop us.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with cluster:
        try:
            cluster.start(timeout=60)
        except (TimeoutError, RuntimeError) as e:
            raise fail(f"cluster did not start: {e} (logs in {directory / 'logs'})") from None
        typer.echo(f"cluster file: {cluster.cluster_file}")
        typer.echo(f"endpoints:    {','.join(cluster.endpoints)}")
        typer.echo(f"logs:         {directory / 'logs'}/<node>/raftkv.log")
        typer.echo(f"try:          raftkv client -e {cluster.endpoints[0]} status")
        typer.echo("Ctrl-C stops every node.")
        try:
            while not stop:
                for n in cluster.nodes.values():
                    if not n.running:
                        typer.echo(
                            f"node {n.id} exited (code {n.process and n.process.returncode})"
                        )
                        stop = True
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        typer.echo("stopping...")
    typer.echo("all nodes stopped")


@app.command()
def demo(
    keys: Annotated[int, typer.Option(help="How many keys to write before the failure.")] = 200,
    base_port: Annotated[
        int, typer.Option(help="gRPC ports are BASE.., Raft ports BASE+100..")
    ] = 7001,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Keep the cluster's files here (default: temp).")
    ] = None,
) -> None:
    """Tell the failover story with local processes: write, kill the busiest leader, recover.

    Exits non-zero if any acknowledged write is lost or the cluster does not recover in time.
    """
    from raftkv.demo import run

    run(keys, base_port, directory)


# -- bench --------------------------------------------------------------------------------------


# These mirror raftkv.bench.Workload / Consistency, so that loading the CLI does not import the
# bench module (and its histogram library) for every other command.
class BenchWorkload(StrEnum):
    put = "put"
    get = "get"
    mixed = "mixed"
    cas = "cas"


class BenchConsistency(StrEnum):
    linearizable = "linearizable"
    stale = "stale"


@app.command()
def bench(
    workload: Annotated[
        BenchWorkload,
        typer.Option(
            "--workload",
            "-w",
            help="put: blind writes. get: reads. mixed: reads and writes (see --read-ratio). "
            "cas: read a key's version, then compare-and-swap on it; a version that changed in "
            "between is counted as a conflict, not an error.",
        ),
    ] = BenchWorkload.put,
    endpoints: Annotated[
        str,
        typer.Option(
            "--endpoints",
            "-e",
            envvar="RAFTKV_ENDPOINTS",
            help="Comma-separated host:port gRPC endpoints of any nodes (the client routes "
            "each key to its shard's leader).",
        ),
    ] = DEFAULT_ENDPOINT,
    batching: Annotated[
        bool,
        typer.Option(
            help="Let the client coalesce concurrent requests into bulk RPCs (the default "
            "client behaviour); --no-batching sends one RPC per operation."
        ),
    ] = True,
    batch: Annotated[
        int,
        typer.Option(
            help="put only: keys per request through the bulk API (PutMany); ops/s then counts "
            "requests and keys_per_s counts keys."
        ),
    ] = 1,
    read_ratio: Annotated[
        float, typer.Option(help="mixed only: fraction of operations that are reads (0..1).")
    ] = 0.5,
    keys: Annotated[
        int, typer.Option(help="Size of the key space; each operation picks a key uniformly.")
    ] = 10_000,
    key_size: Annotated[int, typer.Option(help="Key length in bytes.")] = 16,
    value_size: Annotated[int, typer.Option(help="Value length in bytes (random bytes).")] = 100,
    concurrency: Annotated[
        int,
        typer.Option(
            help="Requests in flight, in total across --procs: each slot is a closed loop that "
            "sends its next request when the previous one answered."
        ),
    ] = 16,
    duration: Annotated[float, typer.Option(help="Seconds of recorded load.")] = 10.0,
    warmup: Annotated[
        float, typer.Option(help="Seconds of load before recording starts (not counted).")
    ] = 1.0,
    procs: Annotated[
        int,
        typer.Option(
            help="Client processes; --concurrency is split evenly over them and their results "
            "merged. One Python client process saturates about one core."
        ),
    ] = 1,
    consistency: Annotated[
        BenchConsistency,
        typer.Option(
            help="Reads: linearizable (through a Raft barrier) or stale (any replica's local copy)."
        ),
    ] = BenchConsistency.linearizable,
    preload: Annotated[
        bool,
        typer.Option(
            help="get, mixed and cas: write every key of the key space before the run, so "
            "reads find values."
        ),
    ] = True,
    server_pids: Annotated[
        str,
        typer.Option(
            help="Comma-separated PIDs of local server processes: also report their CPU "
            "seconds per operation (read from /proc)."
        ),
    ] = "",
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print exactly one JSON object on stdout (ops_per_s, p50_ms, p90_ms, p99_ms, "
            "p999_ms, errors, ops, client_cpu_us_per_op, ...) and no progress bar.",
        ),
    ] = False,
) -> None:
    """Measure throughput and latency: closed-loop load against a running cluster.

    Prints ops/s, latency percentiles (p50/p90/p99/p99.9, from an HDR histogram), errors by
    gRPC status code, and the client's own CPU time per operation. Warmup is not recorded.
    """
    from raftkv import bench as b

    try:
        pids = [int(p) for p in server_pids.split(",") if p.strip()]
        config = b.BenchConfig(
            workload=b.Workload(workload.value),
            keys=keys,
            key_size=key_size,
            value_size=value_size,
            concurrency=concurrency,
            duration=duration,
            warmup=warmup,
            procs=procs,
            read_ratio=read_ratio,
            batch=batch,
            preload=preload,
        )
        b.run_cli(
            config,
            endpoints=endpoints,
            consistency=b.Consistency(consistency.value),
            as_json=as_json,
            server_pids=pids,
            batching=batching,
        )
    except (b.BenchError, ValueError) as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None


def main() -> None:
    app()
