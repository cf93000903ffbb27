"""
The harness pieces that let the suite run in parallel and share servers:
``free_port`` reservations across processes (trial -j workers) and
``class_server``.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.class_servers import class_server, running_class_servers
from tests.harness import _PORT_LOCK_DIR, _held_ports, _reservable_ports, free_port, release_port

# Exit 0 if this (other) process can take the reservation of port argv[1], 1 if it is held.
_TRY_LOCK = """
import fcntl, os, sys
with open(os.path.join(sys.argv[2], sys.argv[1]), "ab") as f:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(1)
"""


def other_process_can_reserve(port: int) -> bool:
    """Whether another process could reserve ``port`` now (as another trial worker would try)."""
    result = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(port), _PORT_LOCK_DIR], timeout=30)
    return result.returncode == 0


class FreePortTests(SynchronousTestCase):
    """Ports handed out by ``free_port`` are reserved against other processes until released."""

    def setUp(self) -> None:
        if len(_reservable_ports()) < 1000:
            self.skipTest("no room below the ephemeral port range on this machine")

    def test_reserved_below_the_ephemeral_range_until_released(self) -> None:
        """A port from free_port lies below the ephemeral range, another process cannot reserve it, and can once it is released."""
        port = free_port()
        self.addCleanup(release_port, port)
        self.assertIn(port, _reservable_ports())
        self.assertIn(port, _held_ports)
        self.assertFalse(other_process_can_reserve(port))
        release_port(port)
        self.assertTrue(other_process_can_reserve(port))

    def test_successive_ports_differ(self) -> None:
        """free_port never hands out a port this process still holds."""
        ports = [free_port() for _ in range(20)]
        for port in ports:
            self.addCleanup(release_port, port)
        self.assertEqual(len(set(ports)), len(ports))

    def test_lock_is_an_flock_on_a_file_named_after_the_port(self) -> None:
        """The reservation is visible to any process that tries the same flock (the contract other runs rely on)."""
        port = free_port()
        self.addCleanup(release_port, port)
        with open(os.path.join(_PORT_LOCK_DIR, str(port)), "ab") as f:
            with self.assertRaises(OSError):
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


class ClassServerTests(TestCase):
    """``class_server`` hands the same healthy process to the same configuration of a class."""

    async def test_same_configuration_same_process(self) -> None:
        """Asking twice with one configuration gives one running process; another configuration gets another."""
        first = await class_server(self)
        again = await class_server(self)
        self.assertIs(first, again)
        self.assertTrue(first.running)
        other = await class_server(self, args=["--legacy-clients"])
        self.assertIsNot(other, first)
        self.assertNotEqual(other.port, first.port)
        self.assertIn(first, running_class_servers())
        status, _ = await first.http_get("/health")
        self.assertEqual(status, 200)

    async def test_dead_server_is_replaced(self) -> None:
        """A class server that died (killed here) is replaced by a new healthy one."""
        first = await class_server(self, args=["--handshake-timeout", "7"])
        await first.kill9()
        second = await class_server(self, args=["--handshake-timeout", "7"])
        self.assertIsNot(second, first)
        self.assertTrue(second.running)
        self.assertNotIn(first, running_class_servers())
        status, _ = await second.http_get("/health")
        self.assertEqual(status, 200)
