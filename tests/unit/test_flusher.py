"""The node's fsync thread and the commit rule that relies on it."""

import threading

from raftkv.errors import StorageError
from raftkv.raft.flusher import Flusher
from raftkv.raft.group import stable_commit
from raftkv.testing.cluster import wait_for


class SlowJournal:
    def __init__(self, gate: threading.Event, fail: bool = False) -> None:
        self.gate = gate
        self.fail = fail
        self.syncs = 0

    def sync(self) -> bool:
        self.gate.wait(5)
        self.syncs += 1
        if self.fail:
            raise StorageError("fsync failed: EIO")
        return True


def test_requests_made_during_a_round_share_the_next_one() -> None:
    gate = threading.Event()
    wakes: list[int] = []
    flusher = Flusher(lambda: wakes.append(1))
    flusher.start()
    try:
        busy, other = SlowJournal(gate), SlowJournal(gate)
        outcomes: list[object] = []
        flusher.request(busy, outcomes.append)  # its round starts and blocks in sync
        wait_for(lambda: not flusher._pending, 5, "the first round to start")
        for _ in range(10):  # asked ten times while the disk is busy
            flusher.request(busy, outcomes.append)
            flusher.request(other, outcomes.append)
        gate.set()
        wait_for(lambda: len(wakes) == 2, 5, "two rounds")
        assert busy.syncs == 2 and other.syncs == 1
        assert outcomes == [None, None, None]
        assert flusher.rounds == 2  # the Raft thread was woken once per round
    finally:
        gate.set()
        flusher.stop()


def test_a_failed_fsync_is_reported_to_its_replica_only() -> None:
    gate = threading.Event()
    gate.set()
    flusher = Flusher(lambda: None)
    flusher.start()
    try:
        bad, good = SlowJournal(gate, fail=True), SlowJournal(gate)
        got: dict[str, object] = {}
        flusher.request(bad, lambda e: got.__setitem__("bad", e))
        flusher.request(good, lambda e: got.__setitem__("good", e))
        wait_for(lambda: len(got) == 2, 5, "both journals to be answered")
        assert isinstance(got["bad"], StorageError) and got["good"] is None
    finally:
        flusher.stop()


def test_a_leader_counts_only_what_a_quorum_has_synced() -> None:
    def term(index: int) -> int:
        return 1 if index <= 10 else 2

    # pysyncobj counted up to 20 with the leader's whole log; the leader synced 12, the
    # followers 15 and 11: a quorum of 3 holds up to 12.
    assert stable_commit(20, 10, [12, 15, 11], term, 2) == 12
    # one follower holds 20 on disk: with it, leader and follower make a quorum
    assert stable_commit(20, 10, [12, 20, 11], term, 2) == 12
    assert stable_commit(20, 10, [12, 20, 20], term, 2) == 20
    # the leader has synced nothing new and neither has a quorum: nothing moves
    assert stable_commit(20, 10, [10, 20, 0], term, 2) == 10
    # the quorum index is an entry of an older term: it may not be committed by counting
    assert stable_commit(20, 5, [8, 9, 20], term, 2) == 5
    # a single replica group commits what it synced
    assert stable_commit(20, 10, [17], term, 2) == 17


def test_background_jobs_run_on_the_fsync_thread() -> None:
    flusher = Flusher(lambda: None)
    flusher.start()
    try:
        ran: list[str] = []
        flusher.submit(lambda: ran.append(threading.current_thread().name))
        wait_for(lambda: bool(ran), 5, "the job to run")
        assert ran == ["fsync"]
    finally:
        flusher.stop()
