"""The interactive shell behind ``raftkv shell``: one client, many commands.

``raftkv client put ...`` starts a process, dials the nodes and learns the ring and the
leaders for every single command. The shell keeps one :class:`~raftkv.client.Client` (its
channels, ring and leader cache) for the whole session, so exploring or repairing a cluster by
hand is quick, as with the REPLs of etcd-style seed stores.

At a terminal it reads lines with prompt-toolkit (history in ``~/.raftkv_history`` or
``$RAFTKV_SHELL_HISTORY``, completion of command names). Otherwise it reads plain lines and
prints no prompt, so the same commands script::

    printf 'put a 1\\nget a\\n' | raftkv shell

Every command is one entry of :data:`COMMANDS`: its handler, usage and help. Lines are split
like a POSIX shell (``shlex``), so ``put k "two words"`` stores a value with a space. A command
that fails prints one line starting with ``error: `` that says what to do, and the session goes
on: only ``exit``, ``quit`` or end of input (Ctrl-D) end it. One asyncio event loop (an
:class:`asyncio.Runner`) serves the whole session, including the prompt, so the client's
channels stay on the loop they were opened on.
"""

from __future__ import annotations

import asyncio
import difflib
import os
import re
import shlex
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from raftkv._pb.raftkv.v1 import admin_pb2 as admin
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv.client import Client, GetResult
from raftkv.config import ConfigError
from raftkv.errors import (
    InvalidArgument,
    KeyNotFound,
    Overloaded,
    PermissionDenied,
    PreconditionFailed,
    ProposalTimeout,
    RaftKVError,
    Unauthenticated,
    Unavailable,
)
from raftkv.network import ClientTLS

HISTORY_ENV = "RAFTKV_SHELL_HISTORY"
DEFAULT_HISTORY = "~/.raftkv_history"
PROMPT = "raftkv> "
EXIT_INTERRUPTED = 130  # a shell's usual status after SIGINT
EXIT_BAD_SETUP = 2


class ShellClient(Protocol):
    """The part of :class:`~raftkv.client.Client` the shell uses (unit tests pass a fake)."""

    endpoints: list[str]

    async def put(self, key: bytes, value: bytes) -> int: ...

    async def get(self, key: bytes, *, stale: bool = False) -> GetResult: ...

    async def delete(self, key: bytes) -> bool: ...

    async def compare_and_swap(
        self,
        key: bytes,
        value: bytes,
        *,
        expected_value: bytes | None = None,
        expected_version: int | None = None,
    ) -> int: ...

    async def status(self) -> kv.StatusResponse: ...

    async def member_add(
        self, node_id: str, grpc_addr: str, raft_addr: str
    ) -> admin.MemberChangeResponse: ...

    async def member_remove(
        self, node_id: str, *, dead: bool = False
    ) -> admin.MemberChangeResponse: ...

    async def close(self) -> None: ...


class CommandError(Exception):
    """A command failed; the message is the whole error line (without ``error: ``)."""


class UsageError(Exception):
    """The arguments do not fit the command; the shell adds the command's usage."""


class EndSession(Exception):
    """``exit`` or ``quit``: the session ends after this command."""


@dataclass(frozen=True)
class Args:
    """A command's words after parsing: positionals in order, and the options given."""

    positional: list[str]
    # flag → its value; a switch (a flag without a value) maps to "".
    options: dict[str, str] = field(default_factory=dict)


Handler = Callable[[ShellClient, Args], Awaitable[str]]


@dataclass(frozen=True)
class Command:
    usage: str
    summary: str
    handler: Handler
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    switches: frozenset[str] = frozenset()  # flags without a value
    valued: frozenset[str] = frozenset()  # flags followed by a value
    details: str = ""


# -- parsing ----------------------------------------------------------------------------------


def split_line(line: str) -> list[str]:
    """The words of a line, quoted as in a POSIX shell; none for a blank or ``#`` line."""
    if not line.strip() or line.lstrip().startswith("#"):
        return []
    try:
        return shlex.split(line)
    except ValueError as e:
        raise CommandError(
            f"cannot split the line: {str(e).lower()}; close the quote, or escape it with \\"
        ) from None


def parse_args(command: Command, words: Sequence[str]) -> Args:
    """Sort ``words`` into positionals and options, checking them against ``command``."""
    positional: list[str] = []
    options: dict[str, str] = {}
    rest = iter(words)
    only_positional = False
    for word in rest:
        if only_positional or not word.startswith("--"):
            positional.append(word)
        elif word == "--":
            only_positional = True
        else:
            name, has_value, value = word.partition("=")
            if name in command.switches and not has_value:
                options[name] = ""
            elif name in command.valued:
                if not has_value:
                    following = next(rest, None)
                    if following is None:
                        raise UsageError(f"{name} needs a value")
                    value = following
                options[name] = value
            else:
                # Values may start with "--" too; "--" before them says so.
                raise UsageError(f"unknown option {word!r} (put -- before a value that starts --)")
    most = len(command.required) + len(command.optional)
    if len(positional) < len(command.required):
        raise UsageError(f"missing {command.required[len(positional)]}")
    if len(positional) > most:
        raise UsageError(f"unexpected argument {positional[most]!r}")
    return Args(positional, options)


def unknown_command(name: str) -> str:
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown command {name!r}{guess}; type 'help' to list the commands"


# -- rendering --------------------------------------------------------------------------------


def _text(value: bytes) -> str:
    # Other clients may store any bytes; show them rather than fail on them.
    return value.decode("utf-8", errors="backslashreplace")


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def render_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns, two spaces apart, as wide as their widest cell."""
    cells = [list(header), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def render_status(s: kv.StatusResponse) -> str:
    moves = list(s.moves)
    lines = [f"epoch {s.epoch} (as {s.node} sees it); moves in progress: {len(moves) or 'none'}"]
    lines += [f"  move  {m}" for m in moves]
    lines += [f"  stuck {m}" for m in s.stuck_moves]
    lines.append("")
    lines += render_table(
        ("NODE", "STATE", "UP", "REPLICAS", "META"),
        [(n.id, n.state or "-", _yes(n.reachable), n.replicas, _yes(n.meta)) for n in s.nodes],
    )
    lines.append("")
    shards = [(str(sh.shard_id), sh) for sh in s.shards]
    if s.HasField("meta"):
        shards.append(("meta", s.meta))
    lines += render_table(
        ("SHARD", "LEADER", "TERM", "COMMIT", "REPLICAS"),
        [
            (name, sh.leader or "-", sh.term, sh.commit_index, ",".join(sh.replicas))
            for name, sh in shards
        ],
    )
    return "\n".join(lines)


def render_members(s: kv.StatusResponse) -> str:
    return "\n".join(
        render_table(
            ("ID", "GRPC", "RAFT", "STATE", "REPLICAS", "META"),
            [(n.id, n.grpc, n.raft, n.state or "-", n.replicas, _yes(n.meta)) for n in s.nodes],
        )
    )


# -- handlers ---------------------------------------------------------------------------------


async def _put(client: ShellClient, args: Args) -> str:
    key, value = args.positional
    version = await client.put(key.encode(), value.encode())
    return f"OK version={version}"


async def _get(client: ShellClient, args: Args) -> str:
    (key,) = args.positional
    try:
        result = await client.get(key.encode(), stale="--stale" in args.options)
    except KeyNotFound:
        raise CommandError(f"key {key!r} not found") from None
    return _text(result.value)


async def _delete(client: ShellClient, args: Args) -> str:
    (key,) = args.positional
    existed = await client.delete(key.encode())
    return "deleted" if existed else "not found (nothing to delete)"


def _expected_version(text: str) -> int:
    if not text.isdigit():
        raise UsageError("--expected-version takes a whole number (0: the key is absent)")
    return int(text)


async def _cas(client: ShellClient, args: Args) -> str:
    key, value = args.positional
    expected = args.options.get("--expected")
    version_text = args.options.get("--expected-version")
    if (expected is None) == (version_text is None):
        raise UsageError("give exactly one of --expected or --expected-version")
    expected_version = _expected_version(version_text) if version_text is not None else None
    try:
        version = await client.compare_and_swap(
            key.encode(),
            value.encode(),
            expected_value=expected.encode() if expected is not None else None,
            expected_version=expected_version,
        )
    except PreconditionFailed as e:
        raise CommandError(
            f"{e}; nothing was written ('get {shlex.quote(key)}' shows the current value)"
        ) from None
    return f"OK version={version}"


async def _status(client: ShellClient, args: Args) -> str:
    return render_status(await client.status())


async def _members(client: ShellClient, args: Args) -> str:
    return render_members(await client.status())


async def _join(client: ShellClient, args: Args) -> str:
    node_id, grpc_addr, raft_addr = args.positional
    reply = await client.member_add(node_id, grpc_addr, raft_addr)
    join = ",".join(client.endpoints)
    return (
        f"added {node_id} (epoch {reply.view.epoch}); {reply.moves} replica move(s) started\n"
        f"the moves wait for the node: start it with 'raftkv serve --join {join} "
        f"--id {node_id} --grpc {grpc_addr} --raft {raft_addr}'"
    )


async def _leave(client: ShellClient, args: Args) -> str:
    (node_id,) = args.positional
    dead = "--dead" in args.options
    reply = await client.member_remove(node_id, dead=dead)
    epoch = reply.view.epoch
    if dead:
        return (
            f"removed {node_id} as dead (epoch {epoch}); {reply.moves} replica move(s) "
            "re-create its replicas on the other nodes"
        )
    return (
        f"{node_id} is leaving (epoch {epoch}); {reply.moves} replica move(s) drain it, then it "
        "is removed ('members' shows progress)"
    )


async def _help(client: ShellClient, args: Args) -> str:
    if args.positional:
        name = args.positional[0].lower()
        command = COMMANDS.get(name)
        if command is None:
            raise CommandError(unknown_command(name))
        details = textwrap.fill(command.details, width=88)
        return "\n".join(
            line for line in (f"usage: {command.usage}", command.summary, details) if line
        )
    return "\n".join(
        [
            "commands:",
            *_command_list(),
            'Quote words with spaces: put greeting "hello world". Ctrl-D leaves the shell.',
        ]
    )


def _command_list(column: int = 28) -> list[str]:
    """One line per command; a usage too long for the column puts its summary below it."""
    width = max(len(c.usage) for c in COMMANDS.values() if len(c.usage) <= column)
    lines = []
    for c in COMMANDS.values():
        if len(c.usage) > width:
            lines += [f"  {c.usage}", f"  {'':<{width}}  {c.summary}"]
        else:
            lines.append(f"  {c.usage:<{width}}  {c.summary}")
    return lines


async def _exit(client: ShellClient, args: Args) -> str:
    raise EndSession


_EXIT_HELP = "Leave the shell (so does Ctrl-D, or the end of input)."

COMMANDS: dict[str, Command] = {
    "put": Command(
        "put KEY VALUE",
        "Store VALUE under KEY; prints its new version.",
        _put,
        required=("KEY", "VALUE"),
    ),
    "get": Command(
        "get KEY [--stale]",
        "Print the value of KEY.",
        _get,
        required=("KEY",),
        switches=frozenset({"--stale"}),
        details="Reads are linearizable; --stale reads a local replica (no quorum needed).",
    ),
    "delete": Command(
        "delete KEY", "Delete KEY, whether or not it exists.", _delete, required=("KEY",)
    ),
    "cas": Command(
        "cas KEY VALUE (--expected V | --expected-version N)",
        "Set KEY to VALUE only if its value is V or version N.",
        _cas,
        required=("KEY", "VALUE"),
        valued=frozenset({"--expected", "--expected-version"}),
        details="--expected-version 0 means the key is absent. On a mismatch nothing is "
        "written and the error names the current version.",
    ),
    "status": Command(
        "status",
        "Epoch, moves, nodes, and each shard's leader and commit.",
        _status,
        details="Shows the cluster as the node that answered sees it, the meta group included.",
    ),
    "members": Command("members", "The nodes: addresses, state, replicas, meta group.", _members),
    "join": Command(
        "join ID GRPC_ADDR RAFT_ADDR",
        "Add a node; then start it with 'raftkv serve --join'.",
        _join,
        required=("ID", "GRPC_ADDR", "RAFT_ADDR"),
        details="Replica moves onto the node start as soon as it runs. Needs an admin token "
        "when the cluster requires tokens.",
    ),
    "leave": Command(
        "leave ID [--dead]",
        "Drain a node's replicas to the others, then remove it.",
        _leave,
        required=("ID",),
        switches=frozenset({"--dead"}),
        details="--dead: the node is gone for good; each group re-creates its replica from "
        "the surviving quorum. Needs an admin token when the cluster requires tokens.",
    ),
    "help": Command(
        "help [COMMAND]", "List the commands, or explain one.", _help, optional=("COMMAND",)
    ),
    "exit": Command("exit", _EXIT_HELP, _exit),
    "quit": Command("quit", _EXIT_HELP, _exit),
}


# -- errors -----------------------------------------------------------------------------------


def _tls_hint(message: str) -> str:
    lowered = message.lower()
    if "certificate verify failed" in lowered or "handshake" in lowered:
        return "; TLS failed: is the CA the one that signed the node certificates?"
    if "socket closed" in lowered:
        return "; does the node require TLS? start the shell with its CA certificate"
    return ""


def describe(error: Exception) -> str:
    """What went wrong and what to do about it, for any error a command can raise."""
    if isinstance(error, CommandError | ConfigError):
        return str(error)
    if isinstance(error, Unavailable):
        hint = f" (leader hint: {error.leader} at {error.leader_endpoint})" if error.leader else ""
        return (
            f"unavailable: {error}{hint}{_tls_hint(str(error))}; check that the nodes are "
            "running and the endpoints are right, then retry"
        )
    if isinstance(error, ProposalTimeout):
        return f"timed out: {error}; the write may still apply: read the key before retrying"
    if isinstance(error, Overloaded):
        return f"overloaded: {error}; retry in a moment"
    if isinstance(error, Unauthenticated):
        return f"not authenticated: {error}; start the shell with a valid token"
    if isinstance(error, PermissionDenied):
        return f"permission denied: {error}; use a token whose role allows this"
    if isinstance(error, InvalidArgument):
        return f"invalid argument: {error}"
    if isinstance(error, RaftKVError):
        return f"{type(error).__name__}: {error}"
    return f"unexpected {type(error).__name__}: {error} (a bug: please report it)"


def error_line(error: Exception) -> str:
    # Server messages may span lines; the promise is one line per error.
    return "error: " + re.sub(r"\s*\n\s*", " ", describe(error)).strip()


# -- the session ------------------------------------------------------------------------------


class Shell:
    """Runs command lines against one client and writes each outcome to ``output``."""

    def __init__(self, client: ShellClient, output: TextIO) -> None:
        self.client = client
        self.output = output

    def say(self, text: str) -> None:
        if text:
            self.output.write(text + "\n")
            self.output.flush()

    async def execute(self, line: str) -> bool:
        """Run one line and print its outcome; False once the session should end."""
        try:
            text = await self._dispatch(line)
        except EndSession:
            return False
        except Exception as e:  # no failed command may end the session
            text = error_line(e)
        self.say(text)
        return True

    async def _dispatch(self, line: str) -> str:
        words = split_line(line)
        if not words:
            return ""
        name = words[0].lower()
        command = COMMANDS.get(name)
        if command is None:
            raise CommandError(unknown_command(name))
        try:
            return await command.handler(self.client, parse_args(command, words[1:]))
        except UsageError as e:
            raise CommandError(f"{name}: {e}; usage: {command.usage}") from None


LineReader = Callable[[], str | None]  # the next line, or None at the end of the input


def history_path() -> Path:
    return Path(os.environ.get(HISTORY_ENV) or DEFAULT_HISTORY).expanduser()


def plain_reader(stream: TextIO) -> LineReader:
    def read() -> str | None:
        line = stream.readline()
        return line.rstrip("\r\n") if line else None

    return read


def prompt_reader(runner: asyncio.Runner, shell: Shell) -> LineReader:
    # Imported here: scripted sessions never need prompt-toolkit.
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory, History, InMemoryHistory

    path = history_path()
    history: History
    try:
        path.touch(exist_ok=True)
        history = FileHistory(str(path))
    except OSError as e:
        shell.say(f"warning: no history file ({path}: {e.strerror or e}); history is per session")
        history = InMemoryHistory()
    session: PromptSession[str] = PromptSession(
        history=history, completer=WordCompleter(sorted(COMMANDS))
    )

    async def prompt() -> str | None:
        try:
            return await session.prompt_async(PROMPT)
        except KeyboardInterrupt:
            return ""  # Ctrl-C drops the line being typed, as in a shell
        except EOFError:
            return None

    return lambda: runner.run(prompt())


def run_session(runner: asyncio.Runner, shell: Shell, read_line: LineReader) -> int:
    """Read and run lines until exit, quit or the end of the input; the exit status."""
    while True:
        try:
            line = read_line()
        except KeyboardInterrupt:  # scripted input: Ctrl-C stops the script
            return EXIT_INTERRUPTED
        if line is None:
            return 0
        try:
            if not runner.run(shell.execute(line)):
                return 0
        except KeyboardInterrupt:
            # The Runner cancelled the command (a dead cluster retries until the deadline).
            shell.say("error: interrupted; the command was abandoned (a write may still apply)")


async def _open_client(
    endpoints: str, timeout: float, tls: ClientTLS | None, token: str | None
) -> Client:
    # Built on the session's loop: its batcher and channels belong to that loop.
    return Client(
        endpoints, timeout=timeout, attempt_timeout=min(5.0, timeout), tls=tls, token=token
    )


def run_shell(
    endpoints: str,
    *,
    timeout: float,
    tls: ClientTLS | None,
    token: str | None,
    input_stream: TextIO | None = None,
    output: TextIO | None = None,
) -> int:
    """Run a shell session against the cluster at ``endpoints``; returns the exit status.

    With ``input_stream`` and ``output`` left out and a terminal on both, the session is
    interactive (prompt, history, completion); otherwise lines are read plainly.
    """
    out = output if output is not None else sys.stdout
    source = input_stream if input_stream is not None else sys.stdin
    # prompt-toolkit reads keys from a terminal and draws on one: it needs both.
    interactive = (
        input_stream is None and output is None and sys.stdin.isatty() and sys.stdout.isatty()
    )
    with asyncio.Runner() as runner:
        try:
            client = runner.run(_open_client(endpoints, timeout, tls, token))
        except ValueError as e:
            out.write(f"error: {e}; give endpoints as HOST:PORT[,HOST:PORT...]\n")
            return EXIT_BAD_SETUP
        except ConfigError as e:
            out.write(f"error: {e}\n")
            return EXIT_BAD_SETUP
        shell = Shell(client, out)
        try:
            if interactive:
                shell.say(f"raftkv shell on {endpoints}: 'help' lists the commands, Ctrl-D leaves")
                return run_session(runner, shell, prompt_reader(runner, shell))
            return run_session(runner, shell, plain_reader(source))
        finally:
            runner.run(client.close())
