"""
The v1 delivery cursor of one socket (PROTOCOL.md §7.2): ``delivered_seq``
moves only on proof that the device received every event due to it.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.server.gateway.delivery import V1Tracker


def live(tracker: V1Tracker, seq: int, device_seq: int) -> None:
    """The socket sends live event ``seq`` (sender's device_seq ``device_seq``)."""
    tracker.sent(seq, device_seq)
    tracker.live_handled(seq)


class CursorTests(SynchronousTestCase):
    """The cursor follows acknowledgements, never sends."""

    def test_cursor_moves_only_on_ack(self) -> None:
        """A sent live event does not move the cursor; its ack does."""
        t = V1Tracker(start=0, head=0)
        live(t, 1, device_seq=7)
        self.assertEqual(t.delivered(), 0)
        self.assertTrue(t.ack(7))
        self.assertEqual(t.delivered(), 1)

    def test_starts_at_previous_cursor(self) -> None:
        """A connection starts from the stored delivered_seq and never reports less."""
        t = V1Tracker(start=10, head=10)
        self.assertEqual(t.delivered(), 10)
        live(t, 11, device_seq=1)
        self.assertEqual(t.delivered(), 10)

    def test_events_not_due_advance_the_cursor(self) -> None:
        """Live events the socket does not send (its own device's) do not hold the cursor back."""
        t = V1Tracker(start=0, head=0)
        t.live_handled(1)
        t.live_handled(2)
        self.assertEqual(t.delivered(), 2)

    def test_unacked_event_holds_later_acks(self) -> None:
        """With seq 1 unacknowledged, acks of seqs 2 and 3 leave the cursor at 0, then 3 once 1 is acked."""
        t = V1Tracker(start=0, head=0)
        for seq, d in ((1, 101), (2, 102), (3, 103)):
            live(t, seq, d)
        t.ack(102)
        t.ack(103)
        self.assertEqual(t.delivered(), 0)
        t.ack(101)
        self.assertEqual(t.delivered(), 3)

    def test_cursor_never_goes_back(self) -> None:
        """After reaching 1, sending seq 2 without an ack keeps the cursor at 1."""
        t = V1Tracker(start=0, head=0)
        live(t, 1, 1)
        t.ack(1)
        live(t, 2, 2)
        self.assertEqual(t.delivered(), 1)


class CollidingDeviceSeqTests(SynchronousTestCase):
    """v1 acks name the sender's device_seq, which collides between senders."""

    def test_two_events_same_device_seq(self) -> None:
        """Two events sent with d=5: one ack does not advance the cursor, the second does."""
        t = V1Tracker(start=0, head=0)
        live(t, 1, device_seq=5)  # from device A
        live(t, 2, device_seq=5)  # from device B
        self.assertTrue(t.ack(5))
        self.assertEqual(t.delivered(), 0)
        self.assertTrue(t.ack(5))
        self.assertEqual(t.delivered(), 2)

    def test_extra_ack_matches_nothing(self) -> None:
        """A third ack for d=5 after two events were acknowledged is ignored."""
        t = V1Tracker(start=0, head=0)
        live(t, 1, 5)
        live(t, 2, 5)
        t.ack(5)
        t.ack(5)
        self.assertFalse(t.ack(5))
        self.assertEqual(t.delivered(), 2)

    def test_unknown_ack_ignored(self) -> None:
        """An ack for a device_seq never sent on this socket returns False and moves nothing."""
        t = V1Tracker(start=0, head=0)
        live(t, 1, 5)
        self.assertFalse(t.ack(6))
        self.assertEqual(t.delivered(), 0)

    def test_early_ack_does_not_prepay(self) -> None:
        """An ack that arrives before any event with its d was sent does not count for a later event."""
        t = V1Tracker(start=0, head=0)
        self.assertFalse(t.ack(5))
        live(t, 1, 5)
        self.assertEqual(t.delivered(), 0)

    def test_expects_ack(self) -> None:
        """expects_ack is true exactly while events sent with d outnumber acks for d."""
        t = V1Tracker(start=0, head=0)
        self.assertFalse(t.expects_ack(5))
        live(t, 1, 5)
        live(t, 2, 5)
        self.assertTrue(t.expects_ack(5))
        t.ack(5)
        self.assertTrue(t.expects_ack(5))
        t.ack(5)
        self.assertFalse(t.expects_ack(5))
        self.assertFalse(t.expects_ack(6))


class BacklogTests(SynchronousTestCase):
    """The backlog start < seq ≤ H and live events after H."""

    def test_live_before_backlog_does_not_skip_backlog(self) -> None:
        """A live event (seq 4) acked before the backlog 1..3 was sent leaves the cursor at the start."""
        t = V1Tracker(start=0, head=3)
        live(t, 4, device_seq=40)
        t.ack(40)
        self.assertEqual(t.delivered(), 0)
        for seq in (1, 2, 3):
            t.sent(seq, 10 + seq)
        t.backlog_covered(3)
        self.assertEqual(t.delivered(), 0)
        t.ack(11)
        t.ack(12)
        self.assertEqual(t.delivered(), 2)
        t.ack(13)
        self.assertEqual(t.delivered(), 4)

    def test_partial_page_limits_cursor(self) -> None:
        """After a page covering seqs up to 2 of a backlog up to 5, the cursor stops at 2 even if all is acked."""
        t = V1Tracker(start=0, head=5)
        t.sent(1, 1)
        t.sent(2, 2)
        t.backlog_covered(2)
        t.ack(1)
        t.ack(2)
        self.assertEqual(t.delivered(), 2)

    def test_backlog_gaps_are_covered(self) -> None:
        """Backlog seqs not due (own or expired events) are covered by the page that skipped them."""
        t = V1Tracker(start=0, head=5)
        t.sent(2, 20)
        t.sent(5, 50)
        t.backlog_covered(5)
        t.ack(20)
        self.assertEqual(t.delivered(), 4)
        t.ack(50)
        self.assertEqual(t.delivered(), 5)

    def test_empty_backlog_then_live(self) -> None:
        """With start = H the cursor follows live acks from H."""
        t = V1Tracker(start=7, head=7)
        live(t, 8, 1)
        t.ack(1)
        self.assertEqual(t.delivered(), 8)

    def test_lowest_unacked(self) -> None:
        """lowest_unacked names the oldest sent event still waiting for its ack."""
        t = V1Tracker(start=0, head=0)
        live(t, 1, 1)
        live(t, 2, 2)
        self.assertEqual(t.lowest_unacked(), 1)
        t.ack(1)
        self.assertEqual(t.lowest_unacked(), 2)
        t.ack(2)
        self.assertIsNone(t.lowest_unacked())


class TrackingLimitTests(SynchronousTestCase):
    """At most ``max_tracked`` unacknowledged events; past that the cursor freezes."""

    def test_at_limit_still_tracked(self) -> None:
        """Exactly max_tracked unacknowledged events are tracked, and their acks advance the cursor."""
        t = V1Tracker(start=0, head=0, max_tracked=3)
        for seq in (1, 2, 3):
            live(t, seq, seq)
        self.assertIsNone(t.frozen)
        for d in (1, 2, 3):
            t.ack(d)
        self.assertEqual(t.delivered(), 3)

    def test_over_limit_freezes(self) -> None:
        """One event past max_tracked freezes the cursor: later acks of everything do not advance it."""
        t = V1Tracker(start=0, head=0, max_tracked=3)
        live(t, 1, 1)
        t.ack(1)
        for seq in (2, 3, 4, 5):
            live(t, seq, seq)
        self.assertEqual(t.frozen, 1)
        for d in (2, 3, 4, 5):
            t.ack(d)
        live(t, 6, 6)
        t.ack(6)
        self.assertEqual(t.delivered(), 1)

    def test_acks_free_tracking_room(self) -> None:
        """Acknowledged events stop counting toward the limit."""
        t = V1Tracker(start=0, head=0, max_tracked=2)
        for seq in range(1, 11):
            live(t, seq, seq)
            t.ack(seq)
        self.assertIsNone(t.frozen)
        self.assertEqual(t.delivered(), 10)
