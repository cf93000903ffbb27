"""
``EventWriter`` group commit (ARCHITECTURE.md, the event path): batching by
reactor turn, one transaction in flight, acks after commit, per-event retry.

The fake storage hands back a Deferred per ``commit_batch`` call that the
test fires by hand, so "the commit is in flight" is a state the test holds.
"""

from __future__ import annotations

from typing import List, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.protocol.events import NewEvent, StoredEvent
from pocketbridge.server.storage import Outcome, StorageUnavailable
from pocketbridge.server.writer import EventWriter

USER = "d04ab232742bb4ab3a1368bd4615e4e6d0224ab71a016baf8520a332c9778737"
DEVICE = "0b0e6f6a-6b1c-4d2e-9f3a-1c2d3e4f5a6b"


def new_event(n: int, payload: str = "QUJD") -> NewEvent:
    return NewEvent(
        user_id=USER,
        device_id=DEVICE,
        event_id="00000000-0000-7000-8000-{:012d}".format(n),
        device_seq=n,
        stream_id="clipboard:main",
        type="clipboard:text",
        encrypted_payload=payload,
        ttl=None,
    )


def stored(event: NewEvent, seq: int, now: int = 0) -> Outcome:
    row = StoredEvent(
        event.user_id, seq, event.event_id, event.device_id, event.device_seq, event.stream_id, seq,
        event.type, event.encrypted_payload, event.ttl, now,
    )
    return Outcome("stored", seq, seq, row)


class FakeStorage:
    """Records each commit_batch call; the test fires its Deferred."""

    def __init__(self) -> None:
        self.calls: List[Tuple[List[NewEvent], int, int, "Deferred[List[Outcome]]"]] = []

    def commit_batch(self, events: List[NewEvent], now: int, max_user_bytes: int) -> "Deferred[List[Outcome]]":
        d: "Deferred[List[Outcome]]" = Deferred()
        self.calls.append((list(events), now, max_user_bytes, d))
        return d

    def batches(self) -> List[List[int]]:
        """The device_seqs of each commit, in call order."""
        return [[e.device_seq for e in call[0]] for call in self.calls]

    def succeed(self, index: int = -1) -> List[Outcome]:
        """Commit call ``index``: every event stored, seq = device_seq."""
        events, now, _, d = self.calls[index]
        outcomes = [stored(e, e.device_seq, now) for e in events]
        d.callback(outcomes)
        return outcomes

    def fail(self, index: int = -1) -> None:
        self.calls[index][3].errback(Failure(StorageUnavailable("commit_batch")))


class WriterTests(SynchronousTestCase):
    """Batching, ordering of acks and retries."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.storage = FakeStorage()
        self.published: List[Outcome] = []
        self.writer = self.make_writer()

    def make_writer(self, **kw: object) -> EventWriter:
        return EventWriter(self.storage, self.clock, self.published.append, max_user_bytes=1000, **kw)  # type: ignore[arg-type]

    def test_same_turn_shares_one_commit(self) -> None:
        """Three events submitted in one reactor turn are committed in one transaction, in order."""
        for n in (1, 2, 3):
            self.writer.submit(new_event(n))
        self.assertEqual(self.storage.calls, [])  # nothing before the turn ends
        self.clock.advance(0)
        self.assertEqual(self.storage.batches(), [[1, 2, 3]])

    def test_commit_gets_time_and_quota(self) -> None:
        """The commit is told the current time in ms and the per-user byte limit."""
        self.writer.submit(new_event(1))
        self.clock.advance(0)
        _, now, max_user_bytes, _ = self.storage.calls[0]
        self.assertEqual((now, max_user_bytes), (1_700_000_000_000, 1000))

    def test_acks_only_after_commit(self) -> None:
        """No submit Deferred fires while its commit is in flight; each fires with its own outcome after."""
        ds = [self.writer.submit(new_event(n)) for n in (1, 2)]
        self.clock.advance(0)
        for d in ds:
            self.assertNoResult(d)
        outcomes = self.storage.succeed()
        self.assertEqual([self.successResultOf(d) for d in ds], outcomes)

    def test_submitted_during_commit_goes_in_next_batch(self) -> None:
        """Events arriving while a commit is in flight wait and then share the next transaction."""
        first = self.writer.submit(new_event(1))
        self.clock.advance(0)
        later = [self.writer.submit(new_event(n)) for n in (2, 3)]
        self.clock.advance(0)
        self.assertEqual(self.storage.batches(), [[1]])  # one transaction in flight at a time
        self.storage.succeed(0)
        self.successResultOf(first)
        self.assertEqual(self.storage.batches(), [[1], [2, 3]])
        for d in later:
            self.assertNoResult(d)
        self.storage.succeed(1)
        self.assertEqual([self.successResultOf(d).seq for d in later], [2, 3])

    def test_publishes_stored_events_after_commit(self) -> None:
        """Only stored outcomes are published, and only after the commit fired."""
        ds = [self.writer.submit(new_event(n)) for n in (1, 2)]
        self.clock.advance(0)
        self.assertEqual(self.published, [])
        events, _, _, d = self.storage.calls[0]
        d.callback([stored(events[0], 1), Outcome("duplicate", 9, 9)])
        self.assertEqual([o.seq for o in self.published], [1])
        self.assertEqual(self.successResultOf(ds[1]).kind, "duplicate")

    def test_failed_batch_retried_one_event_per_transaction(self) -> None:
        """When a 3-event commit fails, each event is retried alone, in order, and each gets its outcome."""
        ds = [self.writer.submit(new_event(n)) for n in (1, 2, 3)]
        self.clock.advance(0)
        self.storage.fail(0)
        self.assertEqual(self.storage.batches(), [[1, 2, 3], [1]])
        for d in ds:
            self.assertNoResult(d)
        self.storage.succeed()
        self.assertEqual(self.storage.batches()[-1], [2])
        self.storage.fail()  # event 2 fails alone: only its submitter sees the failure
        self.assertEqual(self.storage.batches()[-1], [3])
        self.storage.succeed()
        self.assertEqual(self.successResultOf(ds[0]).seq, 1)
        self.failureResultOf(ds[1], StorageUnavailable)
        self.assertEqual(self.successResultOf(ds[2]).seq, 3)

    def test_retry_then_batching_resumes(self) -> None:
        """After the solo retries, events submitted meanwhile are batched together again."""
        ds = [self.writer.submit(new_event(n)) for n in (1, 2)]
        self.clock.advance(0)
        self.storage.fail(0)
        more = [self.writer.submit(new_event(n)) for n in (3, 4)]
        self.clock.advance(0)
        self.storage.succeed()  # 1
        self.storage.succeed()  # 2
        self.assertEqual(self.storage.batches(), [[1, 2], [1], [2], [3, 4]])
        self.storage.succeed()
        self.assertEqual([self.successResultOf(d).seq for d in ds + more], [1, 2, 3, 4])

    def test_single_event_failure_fails_its_ack(self) -> None:
        """A one-event commit that fails fails that submit with StorageUnavailable (no endless retry)."""
        d = self.writer.submit(new_event(1))
        self.clock.advance(0)
        self.storage.fail()
        self.failureResultOf(d, StorageUnavailable)
        self.assertEqual(len(self.storage.calls), 1)

    def test_writer_recovers_after_failure(self) -> None:
        """After a failed commit the next submit is committed normally."""
        d1 = self.writer.submit(new_event(1))
        self.clock.advance(0)
        self.storage.fail()
        self.failureResultOf(d1)
        d2 = self.writer.submit(new_event(2))
        self.clock.advance(0)
        self.storage.succeed()
        self.assertEqual(self.successResultOf(d2).seq, 2)

    def test_max_batch_honoured(self) -> None:
        """With max_batch=2, five events are committed as 2, 2 and 1."""
        writer = self.make_writer(max_batch=2)
        ds = [writer.submit(new_event(n)) for n in range(1, 6)]
        self.clock.advance(0)
        for _ in range(3):
            self.storage.succeed()
        self.assertEqual(self.storage.batches(), [[1, 2], [3, 4], [5]])
        self.assertEqual([self.successResultOf(d).seq for d in ds], [1, 2, 3, 4, 5])

    def test_max_batch_bytes_honoured(self) -> None:
        """A batch stops before the event that would take it over max_batch_bytes; one big event still goes."""
        writer = self.make_writer(max_batch_bytes=10)
        writer.submit(new_event(1, "A" * 8))
        writer.submit(new_event(2, "A" * 4))
        writer.submit(new_event(3, "A" * 16))
        self.clock.advance(0)
        for _ in range(3):
            self.storage.succeed()
        self.assertEqual(self.storage.batches(), [[1], [2], [3]])

    def test_delay_gathers_when_idle(self) -> None:
        """With delay=0.01, events submitted within that time share one commit."""
        writer = self.make_writer(delay=0.01)
        writer.submit(new_event(1))
        self.clock.advance(0.005)
        writer.submit(new_event(2))
        self.assertEqual(self.storage.calls, [])
        self.clock.advance(0.005)
        self.assertEqual(self.storage.batches(), [[1, 2]])

    def test_queued(self) -> None:
        """queued counts events waiting, not the batch in flight."""
        self.writer.submit(new_event(1))
        self.clock.advance(0)
        self.writer.submit(new_event(2))
        self.assertEqual(self.writer.queued, 1)

    def test_flush_when_idle(self) -> None:
        """flush() on an idle writer fires at once."""
        self.successResultOf(self.writer.flush())

    def test_flush_waits_for_everything(self) -> None:
        """flush() fires only after every event submitted before it is committed, across batches."""
        self.writer.submit(new_event(1))
        self.clock.advance(0)
        self.writer.submit(new_event(2))
        flushed = self.writer.flush()
        self.storage.succeed(0)
        self.assertNoResult(flushed)
        self.storage.succeed(1)
        self.successResultOf(flushed)

    def test_flush_before_first_turn(self) -> None:
        """flush() right after submit (commit not started yet) waits for that commit."""
        self.writer.submit(new_event(1))
        flushed = self.writer.flush()
        self.assertNoResult(flushed)
        self.clock.advance(0)
        self.assertNoResult(flushed)
        self.storage.succeed()
        self.successResultOf(flushed)

    def test_flush_fires_after_failure(self) -> None:
        """flush() also fires when the last commit failed (shutdown is not blocked)."""
        d = self.writer.submit(new_event(1))
        flushed = self.writer.flush()
        self.clock.advance(0)
        self.storage.fail()
        self.failureResultOf(d)
        self.successResultOf(flushed)


USERS = ["{:064x}".format(u) for u in (0xA, 0xB, 0xC)]


def user_event(user: int, n: int) -> NewEvent:
    """Event ``n`` of user ``USERS[user]`` (event_id unique across users; device_seq n)."""
    e = new_event(n)
    return NewEvent(USERS[user], e.device_id, "{:08x}-0000-7000-8000-{:012d}".format(user, n), n,
                    e.stream_id, e.type, e.encrypted_payload, e.ttl)


class PipelineTests(SynchronousTestCase):
    """Several batches in flight (``pipeline``), never two holding the same user."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.storage = FakeStorage()
        self.published: List[Outcome] = []
        self.writer = EventWriter(self.storage, self.clock, self.published.append,  # type: ignore[arg-type]
                                  max_user_bytes=1000, pipeline=2)

    def submit(self, user: int, *ns: int) -> List["Deferred[Outcome]"]:
        ds = [self.writer.submit(user_event(user, n)) for n in ns]
        self.clock.advance(0)
        return ds

    def users(self) -> List[List[str]]:
        """The users of each commit call, per event, as indexes into USERS."""
        return [[str(USERS.index(e.user_id)) + ":" + str(e.device_seq) for e in call[0]] for call in self.storage.calls]

    def test_disjoint_users_commit_side_by_side_and_ack_each_after_its_commit(self) -> None:
        """Two batches of different users are in flight at once; each acks and publishes after its own COMMIT, in any order."""
        a = self.submit(0, 1, 2)
        b = self.submit(1, 1)
        self.assertEqual(self.users(), [["0:1", "0:2"], ["1:1"]])
        self.assertEqual(self.writer.in_flight, 2)
        self.storage.succeed(1)
        self.assertEqual([o.seq for o in (self.successResultOf(d) for d in b)], [1])
        for d in a:
            self.assertNoResult(d)
        self.assertEqual([o.stored.user_id for o in self.published if o.stored], [USERS[1]])
        self.storage.succeed(0)
        self.assertEqual([self.successResultOf(d).seq for d in a], [1, 2])
        self.assertEqual([o.stored.user_id for o in self.published if o.stored], [USERS[1], USERS[0], USERS[0]])

    def test_a_user_in_flight_waits_and_keeps_its_order(self) -> None:
        """A user's later events wait for its batch in flight (other users' do not), then commit in arrival order."""
        self.submit(0, 1)
        self.writer.submit(user_event(0, 2))
        self.writer.submit(user_event(1, 1))
        self.writer.submit(user_event(0, 3))
        self.clock.advance(0)
        self.assertEqual(self.users(), [["0:1"], ["1:1"]])
        self.assertEqual(self.writer.queued, 2)
        self.storage.succeed(0)
        self.assertEqual(self.users(), [["0:1"], ["1:1"], ["0:2", "0:3"]])

    def test_depth_is_capped(self) -> None:
        """With pipeline 2 a third user's batch waits until one of the two commits."""
        self.submit(0, 1)
        self.submit(1, 1)
        third = self.submit(2, 1)
        self.assertEqual(len(self.storage.calls), 2)
        self.storage.succeed(1)
        self.assertEqual(self.users()[2], ["2:1"])
        self.assertNoResult(third[0])

    def test_failed_batch_does_not_ack_or_reorder_the_other(self) -> None:
        """One batch fails while another is in flight: the other acks normally; the failed one is probed and isolated after it, in order, never before its own commit."""
        a = self.submit(0, 1)
        b = self.submit(1, 1, 2)
        later = self.writer.submit(user_event(1, 3))
        self.storage.fail(1)
        for d in b + [later]:
            self.assertNoResult(d)
        self.clock.advance(0)
        self.assertEqual(len(self.storage.calls), 2)  # the probe waits for the batch in flight
        self.storage.succeed(0)
        self.assertEqual(self.successResultOf(a[0]).seq, 1)
        self.assertEqual(self.users()[2:], [["1:1"]])  # the probe: the failed batch's first event alone
        self.storage.succeed(2)
        self.storage.succeed(3)
        self.assertEqual(self.users()[2:], [["1:1"], ["1:2"], ["1:3"]])
        self.storage.succeed(4)
        self.assertEqual([self.successResultOf(d).seq for d in b + [later]], [1, 2, 3])
        self.assertTrue(self.writer.storage_ok)

    def test_batch_in_flight_when_another_fails_is_retried_with_it(self) -> None:
        """Both batches in flight fail: the second is not failed on its own but retried with the first, each event alone after the probe."""
        a = self.submit(0, 1, 2)
        b = self.submit(1, 1)
        self.storage.fail(0)
        self.storage.fail(1)
        for d in a + b:
            self.assertNoResult(d)
        self.assertEqual(self.users()[2:], [["1:1"]])  # the probe
        self.storage.succeed(2)
        self.storage.succeed(3)
        self.storage.succeed(4)
        self.assertEqual(self.users()[2:], [["1:1"], ["0:1"], ["0:2"]])
        self.assertEqual([self.successResultOf(d).seq for d in a + b], [1, 2, 1])
        self.assertEqual(self.writer.in_flight, 0)

    def test_outage_fails_both_without_acking(self) -> None:
        """Storage down with two batches in flight: every event fails (none acked), the pipeline is one deep until storage is back."""
        a = self.submit(0, 1, 2)
        b = self.submit(1, 1)
        self.storage.fail(0)
        self.storage.fail(1)
        self.storage.fail(2)  # the probe fails: an outage
        self.failureResultOf(b[0], StorageUnavailable)
        self.clock.advance(1)
        self.storage.fail(3)
        for d in a:
            self.failureResultOf(d, StorageUnavailable)
        self.assertEqual(self.published, [])
        self.submit(0, 3)
        self.clock.advance(1)
        self.submit(1, 2)
        self.assertEqual(self.users()[4:], [["0:3"]])  # one at a time while failing
        self.storage.succeed(4)
        self.assertTrue(self.writer.storage_ok)
        self.assertEqual(self.users()[4:], [["0:3"], ["1:2"]])

    def test_flush_waits_for_every_batch_in_flight(self) -> None:
        """flush() fires only after all batches in flight (and everything queued) committed."""
        self.submit(0, 1)
        self.submit(1, 1)
        self.writer.submit(user_event(0, 2))
        flushed = self.writer.flush()
        self.storage.succeed(1)
        self.assertNoResult(flushed)
        self.storage.succeed(0)
        self.assertNoResult(flushed)
        self.storage.succeed(2)
        self.successResultOf(flushed)
