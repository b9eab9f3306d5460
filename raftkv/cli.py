"""The ``raftkv`` command line: serve a node, talk to a cluster, run a local cluster.

Commands map one-to-one onto the library: ``serve`` builds a :class:`~raftkv.node.Node` and runs
:func:`~raftkv.server.serve`; ``client ...`` uses :class:`~raftkv.client.Client`; ``local up``
uses :class:`~raftkv.testing.cluster.LocalCluster`. Errors print one line on stderr with the
reason (and the leader hint when there is one) and exit non-zero; they never print a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import inspect
import json
import logging
import logging.handlers
import os
import shutil
import signal
import sys
import time
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core

from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv.auth import Authenticator
from raftkv.client import DEFAULT_ENDPOINT, Client
from raftkv.config import (
    SECRET_ENV,
    SECRET_FILE_ENV,
    ClusterConfig,
    ConfigError,
    Limits,
    NodeSettings,
    PeerTLS,
    RaftTuning,
    Security,
    ServerTLS,
    read_secret_file,
)
from raftkv.errors import (
    ClusterMismatch,
    InvalidArgument,
    KeyNotFound,
    Overloaded,
    PermissionDenied,
    PreconditionFailed,
    ProposalTimeout,
    RaftKVError,
    StorageError,
    Unauthenticated,
    Unavailable,
)
from raftkv.lockfile import DataDirBusy, lock_data_dir
from raftkv.logs import FILE_ONLY, LogFormat, LogLevel
from raftkv.logs import configure as configure_logging
from raftkv.network import ClientTLS
from raftkv.view import META_SHARD, ClusterView


def _usage_name(self: Any) -> str:
    # typer (0.29 here) shows a required argument as ``{KEY}`` in usage lines, a mark no other
    # tool uses; write it as click, etcdctl's docs and man pages do: KEY, and [KEY] if optional.
    name = str(self.display_name_raw)
    if not self.required:
        name = f"[{name}]"
    return name + ("..." if self.nargs != 1 else "")


if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = _usage_name  # type: ignore[method-assign]

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 key not found; 2 bad flags, arguments or input; "
    "3 compare-and-swap conflict; 4 cluster unavailable (unreachable, no leader or quorum, "
    "timeout, overload); 5 unusable file or configuration; 6 not authenticated or not "
    "permitted; 7 internal error."
)

app = typer.Typer(
    rich_markup_mode="markdown",
    help="raftkv: a sharded, Raft-replicated key-value store with a gRPC API.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
client_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Talk to a running cluster: put, get, delete, cas, status, endpoint. The options "
    "below may also be given after the command, as with etcdctl "
    "(raftkv client put k v --endpoints ...).",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
)
endpoint_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Per endpoint: is it healthy, and what does it hold (etcdctl endpoint health/status).",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
)
client_app.add_typer(endpoint_app, name="endpoint")
local_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Run a whole cluster of local processes.",
    no_args_is_help=True,
)
certs_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Make a CA and TLS certificates for nodes and clients (like `cockroach cert`).",
    no_args_is_help=True,
)
auth_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Make the cluster secret, the token-signing key, and bearer tokens.",
    no_args_is_help=True,
)
admin_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Change the cluster: members join and leave, replicas move (needs the admin role).",
    no_args_is_help=True,
)
member_app = typer.Typer(
    rich_markup_mode="markdown",
    help="List, add and remove the cluster's nodes (like etcdctl member).",
    no_args_is_help=True,
)
snapshot_app = typer.Typer(
    rich_markup_mode="markdown",
    help="Backups: save every shard to one file; restore it into a new cluster.",
    no_args_is_help=True,
)
admin_app.add_typer(member_app, name="member")
admin_app.add_typer(snapshot_app, name="snapshot")
app.add_typer(client_app, name="client")
app.add_typer(admin_app, name="admin")
app.add_typer(local_app, name="local")
app.add_typer(certs_app, name="certs")
app.add_typer(auth_app, name="auth")


class Exit(IntEnum):
    """Exit codes, one per class of outcome, so a script can tell a conflict from an outage
    (listed in `raftkv --help`)."""

    OK = 0
    NOT_FOUND = 1  # get: the key does not exist
    USAGE = 2  # bad flags or arguments, or a request the cluster rejected as invalid
    CONFLICT = 3  # compare-and-swap: the key's value or version was not the expected one
    UNAVAILABLE = 4  # no node reachable, no leader or quorum, deadline passed, overloaded
    FILE = 5  # a file or configuration that cannot be used (cluster file, data dir, backup...)
    AUTH = 6  # not authenticated, or not permitted
    ERROR = 7  # anything else: an internal error (the message says what)


EXIT_NOT_FOUND = Exit.NOT_FOUND
EXIT_ERROR = Exit.USAGE


def fail(message: str, code: int = Exit.USAGE) -> typer.Exit:
    """One line on stderr, and the exit code of its class."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(int(code))


def exit_code_for(error: BaseException) -> Exit:
    """The class of a failure, as an exit code."""
    from raftkv.backup import BackupError
    from raftkv.raft.transport import RaftBindError

    table: tuple[tuple[type[BaseException], Exit], ...] = (
        (KeyNotFound, Exit.NOT_FOUND),
        (PreconditionFailed, Exit.CONFLICT),
        (Unauthenticated, Exit.AUTH),
        (PermissionDenied, Exit.AUTH),
        (TimeoutError, Exit.UNAVAILABLE),  # an OSError too: before OSError
        (BackupError, Exit.FILE),
        (StorageError, Exit.FILE),
        (ClusterMismatch, Exit.FILE),
        (ConfigError, Exit.FILE),
        (OSError, Exit.FILE),
        (InvalidArgument, Exit.USAGE),
        (ValueError, Exit.USAGE),
        (Unavailable, Exit.UNAVAILABLE),
        (ProposalTimeout, Exit.UNAVAILABLE),
        (Overloaded, Exit.UNAVAILABLE),
        (RaftBindError, Exit.UNAVAILABLE),
    )
    for cls, code in table:
        if isinstance(error, cls):
            return code
    return Exit.ERROR


# Set by LocalCluster for the nodes it starts: a test or `local up` that dies, even by
# SIGKILL, must not leave node processes behind.
class ReadPath(StrEnum):
    read_index = "read-index"
    log_barrier = "log-barrier"


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


def _path_option(flag: str, env: str, help_text: str) -> Any:
    return typer.Option(flag, envvar=env, help=help_text, show_default=False)


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
        str,
        typer.Option("--id", help="This node's id: its `[nodes.ID]` table in the cluster file."),
    ] = "n1",
    join: Annotated[
        str | None,
        typer.Option(
            "--join",
            help="Join a running cluster through these gRPC endpoints (comma-separated): "
            "adds this node (--id, --grpc, --raft) as a member, then serves. Needs an admin "
            "token (RAFTKV_TOKEN_FILE) when the cluster requires tokens. Ignored once the "
            "data dir holds a view (the node is a member already).",
            show_default=False,
        ),
    ] = None,
    grpc_addr: Annotated[
        str | None,
        typer.Option(
            "--grpc", help="This node's gRPC HOST:PORT (with --join).", show_default=False
        ),
    ] = None,
    raft_addr: Annotated[
        str | None,
        typer.Option(
            "--raft", help="This node's Raft HOST:PORT (with --join).", show_default=False
        ),
    ] = None,
    join_token_file: Annotated[
        Path | None,
        _path_option(
            "--join-token-file", "RAFTKV_TOKEN_FILE", "Admin token used to join (with --join)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir", "-d", help="Where journals and snapshots live. [default: ./data/ID]"
        ),
    ] = None,
    log_dir: Annotated[
        Path, typer.Option("--log-dir", help="Logs go to LOG_DIR/ID/raftkv.log.")
    ] = Path("logs"),
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="How much to log.")
    ] = LogLevel.info,
    log_format: Annotated[
        LogFormat,
        typer.Option(help="text for people; json: one object per line, for log shippers."),
    ] = LogFormat.text,
    log_max_mb: Annotated[
        int, typer.Option(help="Rotate raftkv.log when it reaches this many MiB.", min=1)
    ] = 50,
    log_max_files: Annotated[
        int, typer.Option(help="Rotated logs to keep (raftkv.log.1 ...).", min=0)
    ] = 3,
    leader_wait: Annotated[
        float,
        typer.Option(
            help="Seconds a request waits for a shard to elect a leader before UNAVAILABLE."
        ),
    ] = 3.0,
    proposal_timeout: Annotated[
        float, typer.Option(help="Seconds a write (or read barrier) may take to commit.")
    ] = 5.0,
    unsafe_no_fsync: Annotated[
        bool,
        typer.Option(
            "--unsafe-no-fsync",
            help="UNSAFE: do not fsync the Raft journal. By default an entry counts toward a "
            "commit only once a quorum has it on disk (group commit on a dedicated fsync "
            "thread), so acknowledged writes survive power loss of every node. With this "
            "flag they survive process crashes only: a power loss or kernel crash of a "
            "majority at once can lose acknowledged writes. For benchmarks and throwaway "
            "clusters.",
        ),
    ] = False,
    secret_file: Annotated[
        Path | None,
        _path_option(
            "--secret-file",
            SECRET_FILE_ENV,
            "File holding the cluster secret: peers prove they know it on the Raft port, "
            "and Raft traffic is encrypted with keys derived from it. Required (or peer TLS) "
            "when the Raft address is not loopback. Also: RAFTKV_RAFT_SECRET.",
        ),
    ] = None,
    cert_file: Annotated[
        Path | None,
        _path_option("--cert-file", "RAFTKV_CERT_FILE", "TLS certificate of the gRPC port."),
    ] = None,
    key_file: Annotated[
        Path | None,
        _path_option("--key-file", "RAFTKV_KEY_FILE", "TLS private key of the gRPC port."),
    ] = None,
    trusted_ca_file: Annotated[
        Path | None,
        _path_option(
            "--trusted-ca-file",
            "RAFTKV_TRUSTED_CA_FILE",
            "CA that signs client certificates (--client-cert-auth) and the other nodes' "
            "gRPC certificates (this node verifies them when it forwards a request).",
        ),
    ] = None,
    client_cert_auth: Annotated[
        bool,
        typer.Option(
            "--client-cert-auth",
            envvar="RAFTKV_CLIENT_CERT_AUTH",
            help="Require clients to present a certificate signed by --trusted-ca-file.",
        ),
    ] = False,
    peer_cert_file: Annotated[
        Path | None,
        _path_option(
            "--peer-cert-file",
            "RAFTKV_PEER_CERT_FILE",
            "TLS certificate of the Raft port (mutual TLS between nodes; `raftkv certs node`).",
        ),
    ] = None,
    peer_key_file: Annotated[
        Path | None,
        _path_option("--peer-key-file", "RAFTKV_PEER_KEY_FILE", "Private key of the Raft port."),
    ] = None,
    peer_trusted_ca_file: Annotated[
        Path | None,
        _path_option(
            "--peer-trusted-ca-file",
            "RAFTKV_PEER_TRUSTED_CA_FILE",
            "CA that signs the other nodes' peer certificates.",
        ),
    ] = None,
    auth_token_file: Annotated[
        Path | None,
        _path_option(
            "--auth-token-file",
            "RAFTKV_AUTH_TOKEN_FILE",
            "TOML file of static bearer tokens and their roles (read, readwrite, admin). "
            "Re-read on SIGHUP.",
        ),
    ] = None,
    auth_key_file: Annotated[
        Path | None,
        _path_option(
            "--auth-key-file",
            "RAFTKV_AUTH_KEY_FILE",
            "Key that verifies tokens minted by `raftkv auth mint`.",
        ),
    ] = None,
    log_compaction_entries: Annotated[
        int,
        typer.Option(
            help="Compact a shard's log into a snapshot after this many entries (smaller: "
            "shorter restarts and catch-ups, more snapshot writes)."
        ),
    ] = RaftTuning.log_compaction_entries,
    leader_step_down: Annotated[
        float,
        typer.Option(
            help="Seconds a shard leader that hears from no quorum keeps leading before it "
            "steps down (etcd's check-quorum). Its reads and writes never succeed meanwhile: "
            "they need a quorum. Shorter: clients on its side learn sooner that it is gone.",
            min=0.5,
        ),
    ] = RaftTuning.leader_fallback_s,
    max_concurrent_rpcs: Annotated[
        int,
        typer.Option(
            help="RPCs this node handles at once; more are refused at once with "
            "RESOURCE_EXHAUSTED (and a retry hint) instead of slowing everyone down."
        ),
    ] = Limits.max_concurrent_rpcs,
    read_path: Annotated[
        ReadPath,
        typer.Option(
            help="How a leader proves a linearizable read is current. read-index: one "
            "heartbeat round acknowledged by a quorum (batched), no log entry. log-barrier: "
            "commit a no-op entry per batch of reads (slower; kept to compare)."
        ),
    ] = ReadPath.read_index,
    metrics_addr: Annotated[
        str | None,
        typer.Option(
            "--metrics-addr",
            envvar="RAFTKV_METRICS_ADDR",
            help="Serve Prometheus metrics at http://HOST:PORT/metrics (off unless set). "
            "They name shards, nodes and key counts, never keys or values; bind a private "
            "address. The list: docs/operations.md.",
            show_default=False,
        ),
    ] = None,
    recover_from_peers: Annotated[
        bool,
        typer.Option(
            "--recover-from-peers",
            help="Rebuild every shard replica whose files fail their checks from the other "
            "replicas of its shard. The broken directory is kept aside; the rebuilt replica "
            "neither votes nor leads until it has caught up.",
        ),
    ] = False,
) -> None:
    """Run one node: its shard replicas, one Raft port and one gRPC port.

    Every node of a cluster is started with the same --cluster file and its own --id.
    The node answers any key: it serves shards it leads and forwards the rest, one hop,
    to the leader's node.

    Security: on loopback addresses nothing is required. A Raft address that is not
    loopback needs --secret-file (or peer TLS); a gRPC address that is not loopback needs
    client authentication (--auth-token-file / --auth-key-file, or --client-cert-auth).
    See docs/security.md.

    Exit codes: 0 stopped cleanly; 2 bad flags; 4 a port that cannot be bound, or the
    node is already running on this data dir; 5 a cluster file, data dir or other file that
    cannot be used (the message says which).
    """
    from raftkv.node import load_saved_view

    resolved_data_dir = data_dir or Path("data") / node_id
    try:
        saved = load_saved_view(resolved_data_dir)
        config: ClusterConfig | None
        if cluster:
            config = ClusterConfig.load(cluster)
        elif saved is not None or join:
            config = None  # the view (saved, or from the cluster we join) has the node table
        else:
            config = ClusterConfig.single_node()
        if join is not None and not join.strip(" ,"):
            raise fail("--join needs the gRPC endpoints of running nodes (HOST:PORT,...)")
        if join and saved is None and (grpc_addr is None or raft_addr is None):
            raise fail("--join needs this node's --grpc and --raft addresses")
        secret = read_secret_file(secret_file) if secret_file is not None else None
        secret = secret or os.environ.get(SECRET_ENV) or (config.secret if config else None)
        security = Security(
            grpc_tls=_server_tls(cert_file, key_file, trusted_ca_file, client_cert_auth),
            peer_tls=_peer_tls(peer_cert_file, peer_key_file, peer_trusted_ca_file),
            auth_token_file=auth_token_file,
            auth_key_file=auth_key_file,
        )
        authenticator = Authenticator(auth_token_file, auth_key_file)
        limits = Limits(max_concurrent_rpcs=max_concurrent_rpcs)
    except (ConfigError, ValueError, RaftKVError) as e:
        raise fail(str(e), exit_code_for(e)) from None
    if metrics_addr is not None:
        from raftkv.metrics import parse_address

        try:
            parse_address(metrics_addr)
        except ConfigError as e:
            raise fail(str(e), Exit.USAGE) from None
    settings = NodeSettings(
        node_id=node_id,
        data_dir=resolved_data_dir,
        log_dir=log_dir,
        limits=limits,
        leader_wait_s=leader_wait,
        proposal_timeout_s=proposal_timeout,
        raft=RaftTuning(
            fsync=not unsafe_no_fsync,
            log_compaction_entries=log_compaction_entries,
            leader_fallback_s=leader_step_down,
            read_index=read_path is ReadPath.read_index,
        ),
        security=security,
        recover_from_peers=recover_from_peers,
        metrics_addr=metrics_addr,
    )
    if os.environ.get(DIE_WITH_PARENT_ENV) == "1":
        _die_with_parent()
    try:
        # Before the log: a second process on a live data dir must not write into its log.
        lock_data_dir(resolved_data_dir, node_id)
    except DataDirBusy as e:
        raise fail(str(e), Exit.UNAVAILABLE) from None
    except OSError as e:
        message = (
            f"the data dir {resolved_data_dir} is not writable: {e.strerror or e}; check its "
            "permissions, its mount, and that the disk is healthy"
        )
        raise fail(message, Exit.FILE) from None
    # gRPC's own C++ log repeats what we report (a port in use) and adds per-connection
    # noise (TLS handshakes of port scanners); GRPC_VERBOSITY=INFO brings it back.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    path = configure_logging(
        node_id,
        log_dir,
        log_level,
        log_format,
        max_bytes=log_max_mb << 20,
        backups=log_max_files,
    )
    log = logging.getLogger("raftkv.cli")
    log.info("starting node %s (data %s, log %s)", node_id, settings.data_dir, path)

    import uvloop

    from raftkv.node import Node
    from raftkv.raft.transport import RaftBindError
    from raftkv.server import serve as run_server

    async def main() -> None:
        view = saved
        if join and saved is None:
            assert grpc_addr is not None and raft_addr is not None
            view = await _join(join, node_id, grpc_addr, raft_addr, security, join_token_file)
            log.info("joined cluster %s at view epoch %d", view.cluster_id, view.epoch)
        elif join:
            log.info("the data dir holds a cluster view: already a member, --join ignored")
        base = config if config is not None else view.as_config() if view else None
        assert base is not None
        base = dataclasses.replace(base, secret=secret)
        node = Node(base, settings, view, bootstrapped=config is not None)
        log.info("%s", describe_settings(node, secret is not None, metrics_addr))
        await run_server(node, authenticator=authenticator)
        if node.removed.is_set():
            log.warning(
                "node %s was removed from the cluster; its data dir can be deleted", node_id
            )

    try:
        uvloop.run(main())
    except (RaftKVError, RaftBindError, ConfigError) as e:
        log.error("%s", e, extra={FILE_ONLY: True})  # stderr gets it as the error: line
        raise fail(str(e), exit_code_for(e)) from None


def describe_settings(node: Any, has_secret: bool, metrics_addr: str | None) -> str:
    """The node's effective configuration, in one line (never a secret's value)."""
    s = node.settings
    me = node.view.node(node.id)
    security = s.security
    auth = (
        "tokens"
        if security.auth
        else "client certificates"
        if security.grpc_tls is not None and security.grpc_tls.client_cert_auth
        else "none"
    )
    return (
        f"effective configuration: node {node.id}, grpc {me.grpc}, raft {me.raft}, "
        f"data dir {s.data_dir}, fsync {'on' if s.raft.fsync else 'OFF (--unsafe-no-fsync)'}, "
        f"grpc TLS {'on' if security.grpc_tls else 'off'}, "
        f"peer TLS {'on' if security.peer_tls else 'off'}, "
        f"cluster secret {'set' if has_secret else 'not set'}, client auth {auth}, "
        f"reads {'read-index' if s.raft.read_index else 'log-barrier'}, "
        f"metrics {metrics_addr or 'off'}, cluster {node.view.cluster_id} "
        f"({node.view.shards} shards, view epoch {node.view.epoch})"
    )


async def _join(
    endpoints: str,
    node_id: str,
    grpc_addr: str,
    raft_addr: str,
    security: Security,
    token_file: Path | None,
) -> ClusterView:
    """Add this node to a running cluster (MemberAdd at any node) and return the view."""
    tls = None
    if security.grpc_tls is not None:
        t = security.grpc_tls
        tls = ClientTLS(t.trusted_ca_file, t.cert_file, t.key_file)
    try:
        token = token_file.read_text().strip() if token_file is not None else None
    except OSError as e:
        raise ConfigError(
            f"cannot read the join token file {token_file}: {e.strerror or e}"
        ) from None
    token = token or os.environ.get("RAFTKV_TOKEN")
    async with Client(endpoints, timeout=30.0, tls=tls, token=token) as c:
        reply = await c.member_add(node_id, grpc_addr, raft_addr)
    return ClusterView.from_proto(reply.view)


def _server_tls(
    cert: Path | None, key: Path | None, ca: Path | None, client_cert_auth: bool
) -> ServerTLS | None:
    if cert is None and key is None:
        if client_cert_auth:
            raise ConfigError("--client-cert-auth needs TLS: set --cert-file and --key-file")
        return None
    if cert is None or key is None:
        raise ConfigError("--cert-file and --key-file go together: give both")
    return ServerTLS(cert, key, ca, client_cert_auth)


def _peer_tls(cert: Path | None, key: Path | None, ca: Path | None) -> PeerTLS | None:
    given = [p for p in (cert, key, ca) if p is not None]
    if not given:
        return None
    if cert is None or key is None or ca is None:
        raise ConfigError(
            "peer TLS needs all three of --peer-cert-file, --peer-key-file and "
            "--peer-trusted-ca-file"
        )
    return PeerTLS(cert, key, ca)


# -- client ---------------------------------------------------------------------------------


class DemoStory(StrEnum):
    failover = "failover"
    membership = "membership"


class Output(StrEnum):
    table = "table"
    json = "json"
    simple = "simple"


def _write_out(default: Output = Output.table) -> Output:
    """The output format: -w/--write-out (or -o/--output) if given, else the command's own."""
    chosen = _client_opts.get("write_out")
    return chosen if chosen is not None else default


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
    cacert: Annotated[
        Path | None,
        _path_option(
            "--cacert", "RAFTKV_CACERT", "Verify the nodes' TLS certificates with this CA."
        ),
    ] = None,
    cert: Annotated[
        Path | None,
        _path_option("--cert", "RAFTKV_CERT", "Client certificate (for --client-cert-auth)."),
    ] = None,
    key: Annotated[
        Path | None, _path_option("--key", "RAFTKV_KEY", "Private key of --cert.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="RAFTKV_TOKEN",
            help="Bearer token for nodes that require authentication.",
            show_default=False,
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        _path_option("--token-file", "RAFTKV_TOKEN_FILE", "File holding the bearer token."),
    ] = None,
    write_out: Annotated[
        Output | None,
        typer.Option(
            "--write-out",
            "-w",
            "--output",
            "-o",
            envvar="RAFTKV_WRITE_OUT",
            help="Output format of every command: table, json or simple (one fact per "
            "line); -o/--output is the same flag. [default: each command's own; get prints "
            "the bare value]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Options shared by every client command (TLS is used when --cacert, --cert or --key
    is given)."""
    try:
        if token is None and token_file is not None:
            token = token_file.read_text().strip()
    except OSError as e:
        message = f"cannot read the token file {token_file}: {e.strerror or e}"
        raise fail(message, Exit.FILE) from None
    tls = ClientTLS(cacert, cert, key) if (cacert or cert or key) else None
    _client_opts.update(
        endpoints=endpoints, timeout=timeout, tls=tls, token=token, write_out=write_out
    )


def _run(coro_fn: Any) -> Any:
    opened: list[Client] = []

    async def main() -> Any:
        async with Client(
            _client_opts.get("endpoints", DEFAULT_ENDPOINT),
            timeout=_client_opts.get("timeout", 10.0),
            attempt_timeout=min(5.0, _client_opts.get("timeout", 10.0)),
            tls=_client_opts.get("tls"),
            token=_client_opts.get("token"),
        ) as c:
            opened.append(c)
            return await coro_fn(c)

    timeout = _client_opts.get("timeout", 10.0)
    endpoints = _client_opts.get("endpoints", DEFAULT_ENDPOINT)
    try:
        # --timeout bounds the whole command, retries and view refreshes included.
        return asyncio.run(asyncio.wait_for(main(), timeout))
    except TimeoutError:
        last = opened[0].last_error if opened else None
        why = (
            f"the last attempt failed: {last}{_tls_hint(str(last))}"
            if last
            else "is the cluster running and reachable from here?"
        )
        raise fail(
            f"no answer within --timeout {timeout:g}s from {endpoints}; {why}", Exit.UNAVAILABLE
        ) from None
    except Unavailable as e:
        hint = f" (leader hint: {e.leader} at {e.leader_endpoint})" if e.leader else ""
        message = f"unavailable: {e}{hint}{_tls_hint(str(e))}"
        raise fail(message, Exit.UNAVAILABLE) from None
    except Unauthenticated as e:
        raise fail(f"not authenticated: {e}", Exit.AUTH) from None
    except PermissionDenied as e:
        raise fail(f"permission denied: {e}", Exit.AUTH) from None
    except (RaftKVError, ValueError, ConfigError, OSError) as e:
        raise fail(str(e), exit_code_for(e)) from None


def _tls_hint(message: str) -> str:
    """What a TLS mismatch looks like from the client, said plainly."""
    lowered = message.lower()
    if _client_opts.get("tls") is None and "socket closed" in lowered:
        return " (does the node require TLS? pass --cacert or set RAFTKV_CACERT)"
    if "certificate verify failed" in lowered or "ssl" in lowered or "handshake" in lowered:
        return (
            " (TLS handshake failed: is --cacert the CA that signed the node certificates, "
            "and does the endpoint's host appear in them?)"
        )
    return ""


def _read_value(value: str) -> bytes:
    return sys.stdin.buffer.read() if value == "-" else value.encode()


@client_app.command()
def put(
    key: Annotated[str, typer.Argument(metavar="KEY", help="The key (UTF-8).")],
    value: Annotated[
        str, typer.Argument(metavar="VALUE", help="The value; '-' reads it from stdin.")
    ],
) -> None:
    """Store VALUE under KEY. Prints the key's new version."""
    data = _read_value(value)
    version = _run(lambda c: c.put(key.encode(), data))
    _echo_write({"key": key, "version": version}, f"OK version={version}")


@client_app.command()
def get(
    key: Annotated[str, typer.Argument(metavar="KEY", help="The key (UTF-8).")],
    stale: Annotated[
        bool, typer.Option(help="Read any replica's local copy (may be stale; no quorum needed).")
    ] = False,
) -> None:
    """Print the value of KEY on stdout. A missing key exits 1 with a message on stderr.

    -w json prints the key, the value (as text if it is UTF-8, and base64) and its version;
    -w table a KEY/VERSION/VALUE table.
    """
    result = _run(lambda c: c.get(key.encode(), stale=stale))
    fmt = _write_out(Output.simple)
    if fmt == Output.json:
        try:
            text: str | None = result.value.decode()
        except UnicodeDecodeError:
            text = None
        doc = {
            "key": key,
            "value": text,
            "value_base64": base64.b64encode(result.value).decode(),
            "version": result.version,
        }
        typer.echo(json.dumps(doc))
        return
    if fmt == Output.table:
        shown = result.value.decode("utf-8", "backslashreplace")
        typer.echo(f"KEY\tVERSION\tVALUE\n{key}\t{result.version}\t{shown}")
        return
    sys.stdout.buffer.write(result.value)
    if sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


@client_app.command()
def delete(key: Annotated[str, typer.Argument(help="The key (UTF-8).")]) -> None:
    """Delete KEY. Succeeds whether or not it existed."""
    existed = _run(lambda c: c.delete(key.encode()))
    _echo_write(
        {"key": key, "deleted": existed}, "deleted" if existed else "not found (nothing to delete)"
    )


@client_app.command()
def cas(
    key: Annotated[str, typer.Argument(metavar="KEY", help="The key (UTF-8).")],
    value: Annotated[
        str, typer.Argument(metavar="VALUE", help="The new value; '-' reads it from stdin.")
    ],
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
    _echo_write({"key": key, "version": version}, f"OK version={version}")


def _echo_write(doc: dict[str, Any], line: str) -> None:
    """A write's outcome: ``doc`` with -w json, else ``line``."""
    typer.echo(json.dumps(doc) if _write_out() == Output.json else line)


def status_dict(s: kv.StatusResponse) -> dict[str, Any]:
    return {
        "node": s.node,
        "cluster_fingerprint": s.cluster_fingerprint,
        "epoch": s.epoch,
        "moves": list(s.moves),
        "stuck_moves": list(s.stuck_moves),
        "shard_count": s.shard_count,
        "nodes": [
            {
                "id": n.id,
                "grpc": n.grpc,
                "raft": n.raft,
                "reachable": n.reachable,
                "raft_link": n.raft_link or None,
                "state": n.state or "active",
                "replicas": n.replicas,
                "meta": n.meta,
            }
            for n in s.nodes
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
                        "problem": r.problem or None,
                    }
                    for r in sh.replica_status
                ],
            }
            for sh in s.shards
        ],
    }


def render_status(s: kv.StatusResponse) -> str:
    lines = [
        f"cluster {s.cluster_fingerprint}, view epoch {s.epoch}",
        f"NODE  GRPC                  RAFT                  UP   RAFT LINK (from {s.node})",
    ]
    for n in s.nodes:
        link = "-" if n.id == s.node else (n.raft_link or "?")
        lines.append(
            f"{n.id:<5} {n.grpc:<21} {n.raft:<21} {'yes' if n.reachable else 'NO ':<4} {link}"
        )
    lines += ["", "SHARD  REPLICAS          LEADER  TERM  COMMIT  REPLICA COMMIT INDEXES"]
    problems = []
    for sh in s.shards:
        per = " ".join(f"{r.node}={r.commit_index}" for r in sh.replica_status)
        lines.append(
            f"{sh.shard_id:<6} {','.join(sh.replicas):<17} {sh.leader or '-':<7} "
            f"{sh.term:<5} {sh.commit_index:<7} {per}"
        )
        problems += [
            f"shard {sh.shard_id} on {r.node}: {r.problem}" for r in sh.replica_status if r.problem
        ]
    meta = s.meta
    if meta.replicas:
        per = " ".join(f"{r.node}={r.commit_index}" for r in meta.replica_status)
        lines.append(
            f"{'meta':<6} {','.join(meta.replicas):<17} {meta.leader or '-':<7} "
            f"{meta.term:<5} {meta.commit_index:<7} {per}"
        )
        problems += [f"meta on {r.node}: {r.problem}" for r in meta.replica_status if r.problem]
    if s.moves:
        lines += ["", "MOVES IN PROGRESS", *s.moves, *(f"  stuck: {m}" for m in s.stuck_moves)]
    if problems:
        lines += ["", "PROBLEMS", *problems]
    return "\n".join(lines)


@client_app.command()
def status() -> None:
    """Show the nodes and, per shard: replicas, leader, term and commit index."""
    s = _run(lambda c: c.status())
    fmt = _write_out()
    if fmt == Output.json:
        typer.echo(json.dumps(status_dict(s), indent=2))
    elif fmt == Output.simple:
        for shard in [*s.shards, s.meta]:
            name = "meta" if shard.shard_id == META_SHARD else f"shard {shard.shard_id}"
            typer.echo(
                f"{name} leader {shard.leader or 'none'} term {shard.term} "
                f"commit {shard.commit_index} replicas {','.join(shard.replicas)}"
            )
    else:
        typer.echo(render_status(s))


# -- shell ----------------------------------------------------------------------------------


@functools.wraps(client_main)
def _shell(**options: Any) -> None:
    from raftkv.shell import run_shell

    client_main(**options)
    code = run_shell(
        _client_opts["endpoints"],
        timeout=_client_opts["timeout"],
        tls=_client_opts["tls"],
        token=_client_opts["token"],
    )
    raise typer.Exit(code)


_shell.__doc__ = """An interactive shell: put, get, delete, cas, status, members, join, leave.

History and tab completion at a terminal; reads commands line by line from a pipe
(printf 'put a 1\\nget a\\n' | raftkv shell). Type help for the commands.
"""
app.command("shell")(_shell)

# -- version --------------------------------------------------------------------------------


def version_text() -> str:
    import platform

    import grpc
    import pysyncobj

    from raftkv import __version__
    from raftkv.raft.handshake import PROTOCOL_VERSION

    return (
        f"raftkv {__version__} (Raft protocol {PROTOCOL_VERSION}; python "
        f"{platform.python_version()}, grpcio {grpc.__version__}, pysyncobj "
        f"{getattr(pysyncobj, '__version__', '0.3.17')})"
    )


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """raftkv: a sharded, Raft-replicated key-value store with a gRPC API."""


@app.command("version")
def version_command() -> None:
    """Print raftkv's version, its Raft protocol version and its main dependencies."""
    typer.echo(version_text())


# -- endpoint health / status (etcdctl endpoint ...) ----------------------------------------


@endpoint_app.command("health")
def endpoint_health(
    cluster: Annotated[
        bool,
        typer.Option("--cluster", help="Check every node the cluster lists, not only --endpoints."),
    ] = False,
) -> None:
    """Is each endpoint healthy? It must answer the gRPC health check and serve a
    linearizable read (which needs its shard's leader and a quorum). Exits 4 if any is not."""
    from raftkv.endpoints import check_health

    results = _run(lambda c: check_health(c, cluster))
    fmt = _write_out(Output.simple)
    if fmt == Output.json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
    elif fmt == Output.table:
        typer.echo(f"{'ENDPOINT':<24} {'HEALTH':<8} {'TOOK':>9}  ERROR")
        for r in results:
            took = f"{r.took_ms:.1f}ms"
            typer.echo(f"{r.endpoint:<24} {str(r.healthy).lower():<8} {took:>9}  {r.error}")
    else:
        for r in results:
            if r.healthy:
                typer.echo(f"{r.endpoint} is healthy: a linearizable read took {r.took_ms:.1f}ms")
            else:
                typer.echo(f"{r.endpoint} is unhealthy: {r.error}")
    if not all(r.healthy for r in results):
        raise typer.Exit(Exit.UNAVAILABLE)


@endpoint_app.command("status")
def endpoint_status(
    cluster: Annotated[
        bool,
        typer.Option("--cluster", help="Every node the cluster lists, not only --endpoints."),
    ] = False,
) -> None:
    """Per endpoint: node id, version, shards led, replicas, applied index (summed over its
    replicas), highest term, and how long its Status took. Exits 4 if any did not answer."""
    from raftkv.endpoints import check_status

    results = _run(lambda c: check_status(c, cluster))
    fmt = _write_out()
    if fmt == Output.json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        if fmt == Output.table:
            typer.echo(
                f"{'ENDPOINT':<24} {'NODE':<8} {'VERSION':<8} {'LEADS':>5} {'REPLICAS':>8} "
                f"{'APPLIED':>10} {'TERM':>5} {'TOOK':>9}  ERRORS"
            )
        for r in results:
            took = f"{r.took_ms:.1f}ms"
            if fmt == Output.table:
                typer.echo(
                    f"{r.endpoint:<24} {r.node:<8} {r.version:<8} {r.leads:>5} "
                    f"{r.replicas:>8} {r.applied:>10} {r.term:>5} {took:>9}  {r.error}"
                )
            else:
                typer.echo(
                    f"{r.endpoint}: node {r.node or '?'}, version {r.version or '?'}, leads "
                    f"{r.leads} of {r.replicas} replicas, applied {r.applied}, term {r.term}, "
                    f"took {took}" + (f", error: {r.error}" if r.error else "")
                )
    if any(r.error and not r.node for r in results):
        raise typer.Exit(Exit.UNAVAILABLE)


# -- top ------------------------------------------------------------------------------------

TOP_LOG_WIDTH = 160  # wide enough for every column of a frame written to a pipe or file


def _top(
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.2)] = 1.0,
    iterations: Annotated[
        int | None,
        typer.Option(
            "--iterations",
            "-n",
            help="Print this many views (each after one interval, so rates are filled in) "
            "and exit, instead of a live screen: for scripts and logs.",
            min=1,
            show_default=False,
        ),
    ] = None,
    **options: Any,
) -> None:
    from rich.console import Console
    from rich.live import Live

    from raftkv.client import parse_endpoints
    from raftkv.network import Dialer
    from raftkv.top import Sampler, run

    client_main(**options)
    if _write_out() != Output.table:
        raise fail(
            "top draws tables only; for the same facts as JSON use "
            "`raftkv client status -w json` or `raftkv client endpoint status -w json`",
            Exit.USAGE,
        )
    try:
        endpoints = parse_endpoints(_client_opts["endpoints"])
    except ValueError as e:
        raise fail(str(e), exit_code_for(e)) from None
    sampler = Sampler(
        endpoints,
        Dialer(_client_opts["tls"], _client_opts["token"]),
        timeout=min(_client_opts["timeout"], max(1.0, interval * 2)),
    )
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # A pipe or a log file: rich would cut the tables to 80 columns.
        console = Console(width=TOP_LOG_WIDTH)
    try:
        if iterations is not None:
            if not asyncio.run(run(sampler, interval, iterations, console.print)):
                raise fail("no node answered (see the last view above)", Exit.UNAVAILABLE)
            return
        with Live(console=console, auto_refresh=False, screen=console.is_terminal) as live:

            def show(view: Any) -> None:
                live.update(view, refresh=True)

            asyncio.run(run(sampler, interval, None, show))
    except KeyboardInterrupt:
        return  # Ctrl-C is how a live view ends: no traceback, exit 0


_top.__doc__ = """A live view of a running cluster, refreshed every second (Ctrl-C to quit).

Per node: reachable, RPCs answered per second, shards led, replicas. Per shard: leader,
term, commit index, committed entries per second, the replica furthest behind, keys. And
the recent leader changes. Reads the Status API of the --endpoints given (and of every node
they list), so it works against local, compose and Kubernetes clusters alike.
"""
_top.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        *list(inspect.signature(_top, eval_str=True).parameters.values())[:2],
        *inspect.signature(client_main, eval_str=True).parameters.values(),
    ]
)
_top.__annotations__ = {
    p.name: p.annotation
    for p in _top.__signature__.parameters.values()  # type: ignore[attr-defined]
}
app.command("top")(_top)

# -- admin: membership ----------------------------------------------------------------------

admin_app.callback()(client_main)


def members_dict(s: kv.StatusResponse) -> list[dict[str, Any]]:
    return [
        {
            "id": n.id,
            "grpc": n.grpc,
            "raft": n.raft,
            "state": n.state or "active",
            "reachable": n.reachable,
            "replicas": n.replicas,
            "meta": n.meta,
        }
        for n in s.nodes
    ]


def render_members(s: kv.StatusResponse) -> str:
    lines = [
        f"cluster {s.cluster_fingerprint}, view epoch {s.epoch}",
        "ID     STATE    UP   REPLICAS  META  GRPC                   RAFT",
    ]
    for m in members_dict(s):
        lines.append(
            f"{m['id']:<6} {m['state']:<8} {'yes' if m['reachable'] else 'NO':<4} "
            f"{m['replicas']:<9} {'yes' if m['meta'] else '-':<5} {m['grpc']:<22} {m['raft']}"
        )
    if s.moves:
        lines += ["", "MOVES IN PROGRESS", *s.moves, *(f"  stuck: {m}" for m in s.stuck_moves)]
    return "\n".join(lines)


@member_app.command("list")
def member_list() -> None:
    """The nodes: id, addresses, state, reachable, replica count, meta group member."""

    async def current_status(c: Client) -> kv.StatusResponse:
        # The view first, linearizably: the status request then carries its epoch, and a
        # node whose copy is older refreshes it before answering.
        await c.view()
        return await c.status()

    s = _run(current_status)
    if _write_out() == Output.json:
        doc = {"epoch": s.epoch, "members": members_dict(s), "moves": list(s.moves)}
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(render_members(s))


@snapshot_app.command("save")
def snapshot_save(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Where to write the backup.")],
) -> None:
    """Save a point-in-time copy of every shard to FILE (admin role).

    Each shard is copied at a linearizable read index taken after the command starts, so
    every write acknowledged before it started is in the file. The file holds a manifest
    (shard indexes, key counts, data digests) and a SHA-256 of its contents; it is written
    to FILE.partial and renamed when complete.
    """
    from raftkv.backup import save

    if file.is_dir():
        raise fail(f"{file} is a directory: give the path of the file to write")
    manifest = _run(lambda c: save(c, file))
    _print_manifest(manifest, file, _write_out())


@snapshot_app.command("status")
def snapshot_status(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="A backup written by snapshot save.")
    ],
) -> None:
    """Check a backup (every byte, every shard's digest) and show its manifest."""
    from raftkv.backup import BackupError, read_backup

    try:
        backup = read_backup(file)
    except BackupError as e:
        raise fail(str(e), exit_code_for(e)) from None
    _print_manifest(backup.manifest, file, _write_out())


@snapshot_app.command("restore")
def snapshot_restore(
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="A backup written by snapshot save.")
    ],
    cluster: Annotated[
        Path,
        typer.Option(
            "--cluster", "-c", help="The NEW cluster's file (its shard count may differ)."
        ),
    ],
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            "-d",
            help="Where to create the data dirs: one per node, DATA_DIR/ID. They must not "
            "exist yet, or be empty.",
        ),
    ],
    node_ids: Annotated[
        list[str] | None,
        typer.Option(
            "--id",
            help="Only this node's data dir (repeat for several); on a machine per node, "
            "run the restore on each with its own --id. [default: every node]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Make the data dirs of a new cluster from a backup (as etcdctl snapshot restore).

    Keys are placed by the new cluster's ring; every replica starts from a snapshot of its
    part. Then start each node with its data dir: raftkv serve --cluster NEW.toml --id ID
    --data-dir DATA_DIR/ID. Never restore into the data dirs of a running cluster.
    """
    from raftkv.backup import BackupError, read_backup, restore

    try:
        config = ClusterConfig.load(cluster)
        backup = read_backup(file)
        ids = node_ids or [n.id for n in config.nodes]
        restored = restore(backup, config, {n: data_dir / n for n in ids})
    except (BackupError, ConfigError, ValueError) as e:
        raise fail(str(e), exit_code_for(e)) from None
    except OSError as e:
        message = f"cannot write the data dirs under {data_dir}: {e.strerror or e}"
        raise fail(message, Exit.FILE) from None
    total = sum(len(part) for part in backup.shards.values())
    typer.echo(
        f"restored {total:,} keys from {file} ({backup.manifest.shard_count} shards, cluster "
        f"{backup.manifest.cluster_fingerprint}) for {len(restored)} node(s):"
    )
    for node_id, keys in restored.items():
        typer.echo(f"  {node_id}: {data_dir / node_id} ({keys:,} keys in its replicas)")
    first = ids[0]
    typer.echo(
        f"start each node with: raftkv serve --cluster {cluster} --id {first} "
        f"--data-dir {data_dir / first}   (and so on for every node)"
    )


def _print_manifest(manifest: Any, file: Path, output: Output) -> None:
    shards = [
        {
            "shard": s.shard_id,
            "keys": s.keys,
            "read_index": s.read_index,
            "applied_index": s.applied_index,
            "digest": s.digest,
        }
        for s in manifest.shards
    ]
    total = sum(s["keys"] for s in shards)
    size = file.stat().st_size
    if _write_out() == Output.json:
        doc = {
            "file": str(file),
            "bytes": size,
            "sha256": manifest.body_sha256.hex(),
            "cluster": manifest.cluster_fingerprint,
            "epoch": manifest.epoch,
            "started_unix_ms": manifest.started_unix_ms,
            "raftkv_version": manifest.raftkv_version,
            "keys": total,
            "shards": shards,
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.started_unix_ms / 1000))
    typer.echo(
        f"{file}: {total:,} keys, {len(shards)} shards, {size:,} bytes, cluster "
        f"{manifest.cluster_fingerprint} (epoch {manifest.epoch}), save started {started}, "
        f"sha256 {manifest.body_sha256.hex()[:16]}…"
    )
    typer.echo("SHARD  KEYS       READ INDEX  DIGEST")
    for s in shards:
        typer.echo(f"{s['shard']:<6} {s['keys']:<10,} {s['read_index']:<11} {s['digest']}")


@member_app.command("add")
def member_add(
    node_id: Annotated[str, typer.Argument(metavar="ID", help="The new node's id.")],
    grpc_addr: Annotated[str, typer.Option("--grpc", help="Its gRPC HOST:PORT.")],
    raft_addr: Annotated[str, typer.Option("--raft", help="Its Raft HOST:PORT.")],
) -> None:
    """Add a node; replicas move onto it once it runs.

    Then start it: raftkv serve --join ENDPOINTS --id ID --grpc ADDR --raft ADDR --data-dir DIR
    (serve --join alone also adds it: this command is for adding it ahead of time).
    """
    reply = _run(lambda c: c.member_add(node_id, grpc_addr, raft_addr))
    typer.echo(
        f"added {node_id} (view epoch {reply.view.epoch}); {reply.moves} replica moves planned. "
        f"Start it with: raftkv serve --join {_client_opts.get('endpoints', DEFAULT_ENDPOINT)} "
        f"--id {node_id} --grpc {grpc_addr} --raft {raft_addr} --data-dir data/{node_id}"
    )


@member_app.command("remove")
def member_remove(
    node_id: Annotated[str, typer.Argument(metavar="ID", help="The node to remove.")],
    dead: Annotated[
        bool,
        typer.Option(
            "--dead",
            help="The node is gone for good: re-create its replicas on the others from each "
            "group's surviving quorum (a shard that lost its quorum is reported, never "
            "guessed at).",
        ),
    ] = False,
) -> None:
    """Drain a node's replicas to the others, then remove it (the node then stops)."""
    reply = _run(lambda c: c.member_remove(node_id, dead=dead))
    typer.echo(
        f"{node_id} is {'dead' if dead else 'leaving'} (view epoch {reply.view.epoch}); "
        f"{reply.moves} replica moves planned; `raftkv admin member list` shows progress"
    )


@admin_app.command("rebalance")
def rebalance(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only print the plan; change nothing.")
    ] = False,
) -> None:
    """Spread the replicas evenly over the active nodes, moving as few as possible."""
    reply = _run(lambda c: c.rebalance(dry_run=dry_run))
    moves = [
        {
            "shard": "meta" if m.shard_id == META_SHARD else m.shard_id,
            "from": list(m.from_replicas),
            "to": list(m.to_replicas),
        }
        for m in reply.moves
    ]
    if _write_out() == Output.json:
        typer.echo(json.dumps({"epoch": reply.view.epoch, "moves": moves}, indent=2))
        return
    verb = "would move" if dry_run else "moving"
    if not moves:
        typer.echo(f"balanced: no replica to move (view epoch {reply.view.epoch})")
        return
    typer.echo(f"{verb} {len(moves)} groups (view epoch {reply.view.epoch}):")
    for m in moves:
        typer.echo(f"  shard {m['shard']}: {','.join(m['from'])} -> {','.join(m['to'])}")


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
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="Run it as a production cluster would: TLS on both ports, a cluster secret "
            "and bearer tokens, all made under DIR/secure (see docs/security.md).",
        ),
    ] = False,
    serve_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--serve-arg",
            help="An argument for every `raftkv serve` (repeat it), for example "
            "--serve-arg=--read-path=log-barrier or --serve-arg=--unsafe-no-fsync.",
        ),
    ] = None,
    metrics_base_port: Annotated[
        int | None,
        typer.Option(
            help="Serve each node's Prometheus metrics: n1 on 127.0.0.1:PORT, n2 on PORT+1, ...",
            show_default=False,
        ),
    ] = None,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            help="Delete DIR first (its data and logs): start a new cluster even if DIR "
            "holds one with other settings.",
        ),
    ] = False,
    restore: Annotated[
        Path | None,
        typer.Option(
            "--restore",
            help="Start a new cluster from this backup (raftkv admin snapshot save): its "
            "data dirs are made from it first. DIR must be new (or use --fresh).",
            show_default=False,
        ),
    ] = None,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart",
            help="Restart a node that exits (after 2 s), instead of only reporting it: "
            "kill one and watch it fail over and catch up.",
        ),
    ] = False,
) -> None:
    """Start a local cluster of real `raftkv serve` processes; Ctrl-C stops them all.

    A node that exits (or that you kill) is reported and the others keep running, so you can
    watch a failover; the report says how to start it again, or --restart does it.
    """
    from raftkv import certs
    from raftkv.testing.cluster import LocalCluster

    try:
        config = ClusterConfig.local(nodes, shards, replicas, base_port)
        existing = directory / "cluster.toml"
        if fresh and directory.exists():
            if not existing.exists():
                raise fail(
                    f"--fresh would delete {directory}, which holds no local cluster "
                    "(no cluster.toml): give another --dir",
                    Exit.USAGE,
                )
            shutil.rmtree(directory)
        elif existing.exists():
            differences = _local_differences(ClusterConfig.load(existing), config)
            if differences:
                raise fail(
                    f"{directory} holds a local cluster with other settings ("
                    + "; ".join(differences)
                    + "): add --fresh to delete it and start a new one, or give another --dir",
                    Exit.USAGE,
                )
        if restore is not None:
            from raftkv.backup import read_backup
            from raftkv.backup import restore as restore_backup

            if existing.exists():
                raise fail(
                    f"--restore makes a new cluster, but {directory} holds one: add --fresh "
                    "to delete it, or give another --dir",
                    Exit.FILE,  # as `snapshot restore` into an occupied data dir
                )
            backup = read_backup(restore)
            restored = restore_backup(
                backup, config, {n.id: directory / "data" / n.id for n in config.nodes}
            )
            typer.echo(
                f"restored {sum(len(p) for p in backup.shards.values()):,} keys from {restore} "
                f"into {len(restored)} new data dirs under {directory / 'data'}"
            )
        metrics: dict[str, tuple[str, ...]] = (
            {
                n.id: ("--metrics-addr", f"127.0.0.1:{metrics_base_port + i}")
                for i, n in enumerate(config.nodes)
            }
            if metrics_base_port is not None
            else {}
        )
        cluster = LocalCluster(
            config,
            directory,
            secure=secure,
            extra_args=tuple(serve_arg or ()),
            node_args=metrics,
        )
    except (ConfigError, certs.CertError, OSError, RaftKVError) as e:
        raise fail(str(e), exit_code_for(e)) from None
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
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else repr(e)
            raise fail(
                f"cluster did not start: {first} (logs in {directory / 'logs'})",
                Exit.UNAVAILABLE,
            ) from None
        typer.echo(f"cluster file: {cluster.cluster_file}")
        typer.echo(f"endpoints:    {','.join(cluster.endpoints)}")
        typer.echo("pids:         " + " ".join(f"{n.id}={n.pid}" for n in cluster.nodes.values()))
        typer.echo(f"logs:         {directory / 'logs'}/<node>/raftkv.log")
        for node_id, flag in metrics.items():
            typer.echo(f"metrics:      {node_id}: http://{flag[-1]}/metrics")
        if cluster.credentials is not None:
            env = " ".join(f"{k}={v}" for k, v in cluster.credentials.client_env().items())
            typer.echo(f"credentials:  {cluster.credentials.directory}")
            typer.echo(f"try:          {env} raftkv client -e {cluster.endpoints[0]} status")
        else:
            typer.echo(f"try:          raftkv client -e {cluster.endpoints[0]} status")
        typer.echo("Ctrl-C stops every node.")
        down: dict[str, float] = {}  # node id -> when we saw it exit
        try:
            while not stop:
                now = time.monotonic()
                for n in cluster.nodes.values():
                    if n.running:
                        down.pop(n.id, None)
                        continue
                    if n.id not in down:
                        down[n.id] = now
                        code = n.process.returncode if n.process else None
                        how = f"killed by signal {-code}" if code and code < 0 else f"code {code}"
                        typer.echo(
                            f"node {n.id} exited ({how}); the other nodes keep running. "
                            + (
                                "Restarting it in 2 s."
                                if restart
                                else "To start it now by hand (stop it yourself then: Ctrl-C "
                                "here does not reach it): "
                                + " ".join(cluster.command(n.id))
                                + " ; `raftkv local up --restart` restarts nodes that exit"
                            ),
                            err=True,
                        )
                    elif restart and now - down[n.id] >= 2.0:
                        cluster.start_node(n.id, wait=False)
                        typer.echo(f"restarted node {n.id} (pid {n.pid})", err=True)
                if len(down) == len(cluster.nodes) and not restart:
                    typer.echo("every node has exited", err=True)
                    stop = True
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        typer.echo("stopping...")
    typer.echo("all nodes stopped")


def _local_differences(old: ClusterConfig, new: ClusterConfig) -> list[str]:
    """What a `local up` with ``new`` settings changes in the cluster file of ``old``."""
    out = []
    for what, a, b in (
        ("shards", old.shards, new.shards),
        ("replicas", old.replicas, new.replicas),
        ("nodes", len(old.nodes), len(new.nodes)),
    ):
        if a != b:
            out.append(f"{what} {a}, not {b}")
    if len(old.nodes) == len(new.nodes) and old.nodes != new.nodes:
        out.append(f"ports from {old.nodes[0].grpc}, not {new.nodes[0].grpc}")
    return out


@app.command()
def demo(
    story: Annotated[
        DemoStory,
        typer.Option(
            help="failover: kill the busiest leader and recover. membership: grow to 5 nodes, "
            "remove one, replace one killed for good."
        ),
    ] = DemoStory.failover,
    keys: Annotated[
        int | None,
        typer.Option(
            help="How many keys to write (default: 200 for failover, 100000 for membership)."
        ),
    ] = None,
    base_port: Annotated[
        int, typer.Option(help="gRPC ports are BASE.., Raft ports BASE+100..")
    ] = 7001,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Keep the cluster's files here (default: temp).")
    ] = None,
) -> None:
    """Tell a story with local processes: failover (the default) or membership.

    failover: write, kill the busiest leader with SIGKILL, read everything back, recover.
    membership: start 3 nodes, write 100,000 keys, add a 4th and a 5th node (the replica moves
    are shown as they happen), remove a node, replace one killed for good, read every key.
    Exits non-zero if any acknowledged write is lost or a step does not finish in time.
    """
    from raftkv.demo import run, run_membership

    if story is DemoStory.membership:
        run_membership(keys if keys is not None else 100_000, base_port, directory)
    else:
        run(keys if keys is not None else 200, base_port, directory)


# -- certs and auth ---------------------------------------------------------------------------

_DirOption = Annotated[
    Path, typer.Option("--dir", help="Directory of the CA and certificates (created if missing).")
]
_OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Replace files that already exist.")
]


@certs_app.command("init")
def certs_init(
    directory: _DirOption = Path("certs"),
    cluster: Annotated[
        Path | None,
        typer.Option(
            "--cluster", "-c", help="Also make a certificate for every node of this file."
        ),
    ] = None,
    overwrite: _OverwriteOption = False,
) -> None:
    """Make a CA; with --cluster, a certificate per node and an `admin` client certificate.

    Node certificates name the node (a `raftkv://node/ID` SAN, checked on the Raft port)
    and its hosts from the cluster file, and serve both ports.
    """
    from raftkv import certs
    from raftkv.credentials import create_certs

    try:
        if cluster is None:
            certs.create_ca(directory, overwrite=overwrite)
        else:
            create_certs(directory, ClusterConfig.load(cluster), overwrite=overwrite)
    except (certs.CertError, ConfigError) as e:
        raise fail(str(e), exit_code_for(e)) from None
    for f in sorted(directory.glob("*.crt")):
        typer.echo(certs.describe(f))
    if cluster is not None:
        typer.echo(
            f"\nserve each node with: --cert-file {directory}/node-<id>.crt "
            f"--key-file {directory}/node-<id>.key --trusted-ca-file {directory}/ca.crt "
            f"--peer-cert-file {directory}/node-<id>.crt --peer-key-file "
            f"{directory}/node-<id>.key --peer-trusted-ca-file {directory}/ca.crt"
        )
        typer.echo(f"clients: --cacert {directory}/ca.crt (or RAFTKV_CACERT)")


@certs_app.command("node")
def certs_node(
    node_id: Annotated[
        str, typer.Argument(metavar="NODE_ID", help="The node id (as in the cluster file).")
    ],
    hosts: Annotated[
        str,
        typer.Option(help="Comma-separated host names and IPs the node is reached at."),
    ],
    directory: _DirOption = Path("certs"),
    overwrite: _OverwriteOption = False,
) -> None:
    """Make a node certificate signed by the CA in --dir."""
    from raftkv import certs

    try:
        issued = certs.create_node_cert(
            directory,
            node_id,
            [h.strip() for h in hosts.split(",") if h.strip()],
            overwrite=overwrite,
        )
    except certs.CertError as e:
        raise fail(str(e), exit_code_for(e)) from None
    typer.echo(certs.describe(issued.cert))


@certs_app.command("client")
def certs_client(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="The client's name (the certificate's CN).")
    ],
    directory: _DirOption = Path("certs"),
    overwrite: _OverwriteOption = False,
) -> None:
    """Make a client certificate signed by the CA in --dir (for --client-cert-auth)."""
    from raftkv import certs

    try:
        issued = certs.create_client_cert(directory, name, overwrite=overwrite)
    except certs.CertError as e:
        raise fail(str(e), exit_code_for(e)) from None
    typer.echo(certs.describe(issued.cert))


@certs_app.command("list")
def certs_list(directory: _DirOption = Path("certs")) -> None:
    """Show every certificate in --dir: names, SANs and expiry."""
    from raftkv import certs

    found = sorted(directory.glob("*.crt"))
    if not found:
        raise fail(f"no certificates in {directory} (make them with: raftkv certs init)", Exit.FILE)
    for f in found:
        try:
            typer.echo(certs.describe(f))
        except certs.CertError as e:
            typer.echo(f"{f.name}: {e}")


@auth_app.command("init")
def auth_init(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to write raft.secret, auth.key, admin.token.")
    ] = Path("certs"),
    overwrite: _OverwriteOption = False,
) -> None:
    """Make the cluster secret, the token-signing key and an admin token (files mode 0600)."""
    from raftkv.credentials import ADMIN_TOKEN, AUTH_KEY, SECRET, create_auth

    try:
        create_auth(directory, overwrite=overwrite)
    except (OSError, ConfigError, ValueError) as e:
        raise fail(f"{e}", exit_code_for(e)) from None
    typer.echo(f"{directory / SECRET}: the cluster secret (serve --secret-file)")
    typer.echo(f"{directory / AUTH_KEY}: verifies minted tokens (serve --auth-key-file)")
    typer.echo(f"{directory / ADMIN_TOKEN}: an admin token (client --token-file)")


@auth_app.command("mint")
def auth_mint(
    key_file: Annotated[
        Path, typer.Option("--key-file", help="The token-signing key (serve --auth-key-file).")
    ],
    name: Annotated[str, typer.Option(help="Who the token is for (shown in logs).")],
    role: Annotated[str, typer.Option(help="read, readwrite or admin.")] = "readwrite",
    ttl: Annotated[
        str, typer.Option(help="Lifetime: 30m, 12h, 90d, or 0 for a token that never expires.")
    ] = "0",
) -> None:
    """Print a bearer token signed with --key-file; nodes started with that key accept it."""
    from raftkv import auth

    try:
        parsed_role = auth.Role.parse(role)
        seconds = _parse_duration(ttl)
        token = auth.mint_token(
            auth.read_key_file(key_file), name, parsed_role, ttl_s=seconds or None
        )
    except (ValueError, ConfigError) as e:
        raise fail(str(e), exit_code_for(e)) from None
    typer.echo(token)


@auth_app.command("secret")
def auth_secret(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="File to write (mode 0600).")],
    overwrite: _OverwriteOption = False,
) -> None:
    """Write a new random cluster secret to PATH (for serve --secret-file)."""
    from raftkv.credentials import new_secret, write_private

    try:
        write_private(path, new_secret() + "\n", overwrite=overwrite)
    except FileExistsError:
        raise fail(f"{path} exists; pass --overwrite to replace it") from None
    except OSError as e:
        raise fail(f"cannot write {path}: {e.strerror or e}", Exit.FILE) from None
    typer.echo(f"wrote a new cluster secret to {path}")


def _parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    if text in ("0", ""):
        return 0.0
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except ValueError:
        raise ValueError(f"bad duration {text!r}: use e.g. 30m, 12h, 90d or 0") from None
    if value <= 0:
        raise ValueError(f"bad duration {text!r}: must be positive (or 0 for no expiry)")
    return value


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
    plain: Annotated[
        bool,
        typer.Option(
            "--plain",
            help="Drive the cluster as any gRPC client would: one RPC per operation to each "
            "endpoint in turn, no leader awareness, no batching, no retries (requests for "
            "shards led elsewhere are forwarded by the node).",
        ),
    ] = False,
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
    cacert: Annotated[
        Path | None, _path_option("--cacert", "RAFTKV_CACERT", "CA of a TLS cluster.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="RAFTKV_TOKEN", help="Bearer token.", show_default=False),
    ] = None,
    token_file: Annotated[
        Path | None,
        _path_option("--token-file", "RAFTKV_TOKEN_FILE", "File holding the bearer token."),
    ] = None,
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
            plain=plain,
            tls=ClientTLS(cacert) if cacert else None,
            token=token or (token_file.read_text().strip() if token_file else None),
        )
    except (b.BenchError, ValueError, OSError) as e:
        raise fail(str(e), exit_code_for(e)) from None
    except KeyboardInterrupt:
        raise fail("interrupted", 130) from None


# Options of the client and admin groups, and whether each takes a value: etcdctl accepts
# global flags anywhere on the line, click only before the subcommand.
_GROUP_OPTIONS = {
    "--endpoints": True,
    "-e": True,
    "--timeout": True,
    "--cacert": True,
    "--cert": True,
    "--key": True,
    "--token": True,
    "--token-file": True,
    "--write-out": True,
    "-w": True,
    "--output": True,
    "-o": True,
}


def hoist_group_options(argv: list[str]) -> list[str]:
    """Move the client/admin group options found after the subcommand to just after the
    group name, where click expects them (`client put k v -e X` is `client -e X put k v`)."""
    if not argv or argv[0] not in ("client", "admin"):
        return argv
    moved: list[str] = []
    rest: list[str] = []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        name, eq, _ = arg.partition("=")
        if name in _GROUP_OPTIONS and (eq or i + 1 < len(argv)):
            taken = [arg] if eq else [arg, argv[i + 1]]
            moved.extend(taken)
            i += len(taken)
            continue
        rest.append(arg)
        i += 1
    return [argv[0], *moved, *rest]


def main() -> None:
    app(args=hoist_group_options(sys.argv[1:]), prog_name="raftkv")
