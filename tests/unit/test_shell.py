"""The shell's parsing, dispatch and error lines, against a fake client (no cluster)."""

import asyncio
import io
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raftkv import shell
from raftkv._pb.raftkv.v1 import admin_pb2 as admin
from raftkv._pb.raftkv.v1 import kv_pb2 as kv
from raftkv.client import GetResult
from raftkv.errors import (
    KeyNotFound,
    PermissionDenied,
    PreconditionFailed,
    ProposalTimeout,
    Unavailable,
)


class FakeClient:
    """A dict standing in for the cluster; ``fail`` makes every RPC raise that error."""

    def __init__(self) -> None:
        self.endpoints = ["127.0.0.1:7001", "127.0.0.1:7002"]
        self.data: dict[bytes, tuple[bytes, int]] = {}
        self.fail: BaseException | None = None
        self.calls: list[tuple[Any, ...]] = []
        self.closed = False
        # How run_shell built this client: (args, kwargs) per construction.
        self.built: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def _check(self, *call: Any) -> None:
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    async def put(self, key: bytes, value: bytes) -> int:
        self._check("put", key, value)
        version = self.data.get(key, (b"", 0))[1] + 1
        self.data[key] = (value, version)
        return version

    async def get(self, key: bytes, *, stale: bool = False) -> GetResult:
        self._check("get", key, stale)
        if key not in self.data:
            raise KeyNotFound(f"key not found: {key!r}")
        value, version = self.data[key]
        return GetResult(value, version, 0, "n1")

    async def delete(self, key: bytes) -> bool:
        self._check("delete", key)
        return self.data.pop(key, None) is not None

    async def compare_and_swap(
        self,
        key: bytes,
        value: bytes,
        *,
        expected_value: bytes | None = None,
        expected_version: int | None = None,
    ) -> int:
        self._check("cas", key, value, expected_value, expected_version)
        current, version = self.data.get(key, (b"", 0))
        if (expected_value is not None and expected_value != current) or (
            expected_version is not None and expected_version != version
        ):
            raise PreconditionFailed(f"compare-and-swap failed: the current version is {version}")
        self.data[key] = (value, version + 1)
        return version + 1

    async def status(self) -> kv.StatusResponse:
        self._check("status")
        return STATUS

    async def member_add(
        self, node_id: str, grpc_addr: str, raft_addr: str
    ) -> admin.MemberChangeResponse:
        self._check("member_add", node_id, grpc_addr, raft_addr)
        return admin.MemberChangeResponse(view=admin.ClusterView(epoch=7), moves=3)

    async def member_remove(
        self, node_id: str, *, dead: bool = False
    ) -> admin.MemberChangeResponse:
        self._check("member_remove", node_id, dead)
        return admin.MemberChangeResponse(view=admin.ClusterView(epoch=8), moves=2)

    async def close(self) -> None:
        self.closed = True


STATUS = kv.StatusResponse(
    node="n1",
    epoch=5,
    moves=["shard 3: n1,n2,n3 -> n1,n2,n4"],
    nodes=[
        kv.NodeInfo(
            id="n1", grpc="127.0.0.1:7001", raft="127.0.0.1:7101", reachable=True,
            state="active", meta=True, replicas=8,
        ),
        kv.NodeInfo(
            id="n4", grpc="127.0.0.1:7004", raft="127.0.0.1:7104", reachable=False,
            state="leaving", meta=False, replicas=1,
        ),
    ],
    shards=[
        kv.ShardStatus(shard_id=0, replicas=["n1", "n4"], leader="n1", term=3, commit_index=42),
        kv.ShardStatus(shard_id=1, replicas=["n1", "n4"], leader="", term=2, commit_index=9),
    ],
    meta=kv.ShardStatus(shard_id=4294967295, replicas=["n1"], leader="n1", term=1, commit_index=4),
)  # fmt: skip


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClient]:
    """run_shell builds this fake instead of a real Client, and records how it was built."""
    client = FakeClient()

    def make(*args: Any, **kwargs: Any) -> FakeClient:
        client.built.append((args, kwargs))
        return client

    monkeypatch.setattr(shell, "Client", make)
    yield client


def run(text: str, timeout: float = 10.0) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = shell.run_shell(
        "127.0.0.1:7001",
        timeout=timeout,
        tls=None,
        token=None,
        input_stream=io.StringIO(text),
        output=out,
    )
    return code, out.getvalue().splitlines()


def test_put_get_round_trip_with_quoting(fake: FakeClient) -> None:
    code, lines = run("put a \"hello world\"\nget a\nput 'my key' 'two  spaces'\nget 'my key'\n")
    assert code == 0
    assert lines == ["OK version=1", "hello world", "OK version=1", "two  spaces"]
    assert fake.data[b"my key"] == (b"two  spaces", 1)


def test_the_client_is_built_once_and_closed_at_exit(fake: FakeClient) -> None:
    code, _ = run("put a 1\nget a\nexit\n", timeout=30.0)
    assert code == 0
    assert fake.closed
    assert len(fake.built) == 1
    args, kwargs = fake.built[0]
    assert args == ("127.0.0.1:7001",)
    assert kwargs == {"timeout": 30.0, "attempt_timeout": 5.0, "tls": None, "token": None}


def test_unknown_command_is_one_error_line_and_the_loop_goes_on(fake: FakeClient) -> None:
    code, lines = run("bogus thing\nput a 1\ngte a\nget a\n")
    assert code == 0
    assert lines[0].startswith("error: unknown command 'bogus'") and "'help'" in lines[0]
    assert lines[1] == "OK version=1"
    assert lines[2].startswith("error: ") and "did you mean 'get'" in lines[2]
    assert lines[3] == "1"
    assert len(lines) == 4


@pytest.mark.parametrize(
    ("line", "reason", "usage"),
    [
        ("put a", "missing VALUE", "put KEY VALUE"),
        ("put", "missing KEY", "put KEY VALUE"),
        ("get a b", "unexpected argument 'b'", "get KEY [--stale]"),
        ("get a --fresh", "unknown option '--fresh'", "get KEY [--stale]"),
        ("delete", "missing KEY", "delete KEY"),
        ("cas a b", "exactly one of --expected or --expected-version", "cas KEY VALUE"),
        ("cas a b --expected x --expected-version 1", "exactly one of", "cas KEY VALUE"),
        ("cas a b --expected-version one", "whole number", "cas KEY VALUE"),
        ("cas a b --expected", "--expected needs a value", "cas KEY VALUE"),
        ("join n4 127.0.0.1:7004", "missing RAFT_ADDR", "join ID GRPC_ADDR RAFT_ADDR"),
        ("leave", "missing ID", "leave ID [--dead]"),
        ("status now", "unexpected argument 'now'", "usage: status"),
        ("exit now", "unexpected argument 'now'", "usage: exit"),
    ],
)
def test_wrong_arguments_show_the_usage(
    fake: FakeClient, line: str, reason: str, usage: str
) -> None:
    code, lines = run(f"{line}\nput after 1\n")
    assert code == 0
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: ") and reason in lines[0] and usage in lines[0]
    assert lines[1] == "OK version=1"
    assert not any(c[0] != "put" for c in fake.calls), "a bad command reached the client"


def test_double_dash_lets_a_value_start_with_dashes(fake: FakeClient) -> None:
    _, lines = run("put -- k --not-an-option\nget k\nput k2 --x=1\n")
    assert lines[:2] == ["OK version=1", "--not-an-option"]
    assert lines[2].startswith("error: put: unknown option '--x=1'")


def test_an_unclosed_quote_is_an_error_line(fake: FakeClient) -> None:
    _, lines = run('put a "oops\nput b ok\n')
    assert lines[0].startswith("error: cannot split the line") and "quote" in lines[0]
    assert lines[1] == "OK version=1"


def test_blank_lines_and_comments_do_nothing(fake: FakeClient) -> None:
    code, lines = run("\n   \n# a comment\n  # indented\nput a 1\n")
    assert (code, lines) == (0, ["OK version=1"])


def test_get_missing_key(fake: FakeClient) -> None:
    _, lines = run("get x\nget 'a b'\n")
    assert lines == ["error: key 'x' not found", "error: key 'a b' not found"]


def test_get_stale_and_binary_values(fake: FakeClient) -> None:
    fake.data[b"bin"] = (b"\xff\x00ok", 1)
    _, lines = run("get bin --stale\n")
    assert lines == ["\\xff\x00ok"]
    assert fake.calls[-1] == ("get", b"bin", True)


def test_delete(fake: FakeClient) -> None:
    _, lines = run("put a 1\ndelete a\ndelete a\nget a\n")
    assert lines == ["OK version=1", "deleted", "not found (nothing to delete)", lines[3]]
    assert lines[3] == "error: key 'a' not found"


def test_cas_by_value_and_version(fake: FakeClient) -> None:
    _, lines = run(
        "put a 'hello world'\n"
        "cas a new --expected 'hello world'\n"
        "cas a newer --expected-version=2\n"
        "cas a lost --expected nope\n"
        "get a\n"
    )
    assert lines[:3] == ["OK version=1", "OK version=2", "OK version=3"]
    assert lines[3].startswith("error: compare-and-swap failed: the current version is 3")
    assert "nothing was written" in lines[3] and "get a" in lines[3]
    assert lines[4] == "newer"


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (Unavailable("no leader\nfor shard 3", leader="n2", leader_endpoint="h:2"), "unavailable"),
        (PermissionDenied("role readonly cannot write"), "permission denied"),
        (ProposalTimeout("deadline passed"), "timed out"),
        (RuntimeError("boom"), "unexpected RuntimeError"),
    ],
)
def test_rpc_errors_are_one_line_and_the_shell_goes_on(
    fake: FakeClient, error: Exception, words: str
) -> None:
    fake.fail = error
    code, lines = run("put a 1\nstatus\nget a\n")
    assert code == 0
    assert len(lines) == 3
    assert all(line.startswith(f"error: {words}") for line in lines), lines


def test_unavailable_names_the_leader_hint(fake: FakeClient) -> None:
    fake.fail = Unavailable("no leader", leader="n2", leader_endpoint="h:2")
    _, lines = run("get a\n")
    assert "leader hint: n2 at h:2" in lines[0] and "endpoints" in lines[0]


def test_help_lists_every_command(fake: FakeClient) -> None:
    code, lines = run("help\n")
    text = "\n".join(lines)
    assert code == 0
    for name, command in shell.COMMANDS.items():
        assert command.usage in text, name
    assert {"put", "get", "delete", "cas", "status", "members", "join", "leave", "help"} <= set(
        shell.COMMANDS
    )
    assert {"exit", "quit"} <= set(shell.COMMANDS)


def test_help_on_one_command(fake: FakeClient) -> None:
    _, lines = run("help cas\nhelp nope\n")
    assert lines[0] == "usage: " + shell.COMMANDS["cas"].usage
    assert lines[-1].startswith("error: unknown command 'nope'")


@pytest.mark.parametrize("word", ["exit", "quit", "EXIT"])
def test_exit_ends_the_session(fake: FakeClient, word: str) -> None:
    code, lines = run(f"put a 1\n{word}\nput b 2\n")
    assert (code, lines) == (0, ["OK version=1"])
    assert b"b" not in fake.data


def test_end_of_input_ends_the_session(fake: FakeClient) -> None:
    assert run("put a 1") == (0, ["OK version=1"])
    assert run("") == (0, [])


def test_status_table(fake: FakeClient) -> None:
    _, lines = run("status\n")
    assert lines[0] == "epoch 5 (as n1 sees it); moves in progress: 1"
    assert lines[1] == "  move  shard 3: n1,n2,n3 -> n1,n2,n4"
    text = "\n".join(lines)
    assert "NODE  STATE    UP   REPLICAS  META" in text
    assert "n4    leaving  NO   1         NO" in text
    assert "SHARD  LEADER  TERM  COMMIT  REPLICAS" in text
    assert "0      n1      3     42      n1,n4" in text
    assert "1      -       2     9       n1,n4" in text
    assert "meta   n1      1     4       n1" in text


def test_members_table(fake: FakeClient) -> None:
    _, lines = run("members\n")
    assert lines[0].split() == ["ID", "GRPC", "RAFT", "STATE", "REPLICAS", "META"]
    assert lines[1].split() == ["n1", "127.0.0.1:7001", "127.0.0.1:7101", "active", "8", "yes"]
    assert lines[2].split() == ["n4", "127.0.0.1:7004", "127.0.0.1:7104", "leaving", "1", "NO"]


def test_join_and_leave(fake: FakeClient) -> None:
    _, lines = run("join n4 127.0.0.1:7004 127.0.0.1:7104\nleave n3\nleave n2 --dead\n")
    assert fake.calls == [
        ("member_add", "n4", "127.0.0.1:7004", "127.0.0.1:7104"),
        ("member_remove", "n3", False),
        ("member_remove", "n2", True),
    ]
    assert lines[0] == "added n4 (epoch 7); 3 replica move(s) started"
    assert "raftkv serve --join 127.0.0.1:7001,127.0.0.1:7002 --id n4" in lines[1]
    assert lines[2].startswith("n3 is leaving (epoch 8); 2 replica move(s)")
    assert lines[3].startswith("removed n2 as dead (epoch 8); 2 replica move(s)")


def test_ctrl_c_during_a_command_abandons_only_that_command(fake: FakeClient) -> None:
    async def slow_status() -> kv.StatusResponse:
        signal.raise_signal(signal.SIGINT)
        await asyncio.sleep(30)
        raise AssertionError("not interrupted")

    fake.status = slow_status  # type: ignore[method-assign]
    # A background job of a non-interactive shell (a CI runner) starts with SIGINT ignored;
    # a terminal user's shell has Python's handler, which is what this test is about.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, lines = run("status\nput a 1\n")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 0
    assert lines[0].startswith("error: interrupted")
    assert lines[1] == "OK version=1"


def test_ctrl_c_while_reading_a_script_stops_it(fake: FakeClient) -> None:
    class Interrupted(io.StringIO):
        def readline(self, size: int = -1, /) -> str:  # type: ignore[override]
            raise KeyboardInterrupt

    code = shell.run_shell(
        "h:1", timeout=1, tls=None, token=None, input_stream=Interrupted(), output=io.StringIO()
    )
    assert code == shell.EXIT_INTERRUPTED
    assert fake.closed


def test_no_endpoints_is_a_clear_error() -> None:
    out = io.StringIO()
    code = shell.run_shell(
        " , ", timeout=1, tls=None, token=None, input_stream=io.StringIO(""), output=out
    )
    assert code == shell.EXIT_BAD_SETUP
    assert out.getvalue().startswith("error: no endpoints given; give endpoints as HOST:PORT")


def test_interactive_prompt_keeps_history_and_survives_ctrl_c(
    fake: FakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    history = tmp_path / "history"
    monkeypatch.setenv(shell.HISTORY_ENV, str(history))
    out = io.StringIO()
    with create_pipe_input() as keys, create_app_session(input=keys, output=DummyOutput()):
        # Ctrl-C drops the half-typed line; Ctrl-D at an empty prompt ends the session.
        keys.send_text("put a 1\rdelete a\x03put b 2\r\x04")
        with asyncio.Runner() as runner:
            session = shell.Shell(fake, out)
            code = shell.run_session(runner, session, shell.prompt_reader(runner, session))
    assert code == 0
    assert out.getvalue().splitlines() == ["OK version=1", "OK version=1"]
    assert set(fake.data) == {b"a", b"b"}
    saved = history.read_text()
    assert "+put a 1" in saved and "+put b 2" in saved and "delete" not in saved
