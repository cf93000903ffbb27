"""
The CLI's key-file merge (``pocketbridge.cli.support.save_keys``): two
commands of one device (a ``send`` beside a running ``watch``) share a key
file, and neither may undo what the other saved.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any, List

from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.cli.support import key_file_lock, save_keys
from pocketbridge.client import DeviceKeys


class SaveKeysTests(SynchronousTestCase):
    """Counters only grow, pins are kept, and the read-merge-write runs under one lock."""

    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "device.json")
        self.keys = DeviceKeys.generate(device_name="laptop")
        self.keys.save(self.path)

    def lock_is_free(self) -> bool:
        """Whether another open file description could take the key file's lock right now."""
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def test_a_stale_copy_does_not_undo_a_reserved_seq(self) -> None:
        """A watch's stale copy saving its resume point keeps the seq a send reserved meanwhile."""
        watch = DeviceKeys.load(self.path)
        send = DeviceKeys.load(self.path)
        send.next_device_seq = 7
        save_keys(send, self.path)
        watch.last_received_seq = 12
        save_keys(watch, self.path)
        on_disk = DeviceKeys.load(self.path)
        self.assertEqual((on_disk.next_device_seq, on_disk.last_received_seq), (7, 12))

    def test_pins_for_other_servers_are_kept(self) -> None:
        """A pin another command saved for another server survives a save from a copy without it."""
        stale = DeviceKeys.load(self.path)
        other = DeviceKeys.load(self.path)
        other.pin_server_key("wss://b.example", "ab" * 32)
        save_keys(other, self.path)
        save_keys(stale, self.path)
        self.assertEqual(DeviceKeys.load(self.path).pinned_server_key("wss://b.example"), "ab" * 32)

    def test_read_and_write_happen_under_the_lock(self) -> None:
        """While save_keys reads and writes the file, no other process can take the lock."""
        seen: List[str] = []
        real_load, real_save = DeviceKeys.load.__func__, DeviceKeys.save  # type: ignore[attr-defined]

        def load(cls: Any, path: str) -> DeviceKeys:
            seen.append("load locked" if not self.lock_is_free() else "load free")
            return real_load(cls, path)  # type: ignore[no-any-return]

        def save(keys: DeviceKeys, path: str) -> None:
            seen.append("save locked" if not self.lock_is_free() else "save free")
            real_save(keys, path)

        self.patch(DeviceKeys, "load", classmethod(load))
        self.patch(DeviceKeys, "save", save)
        save_keys(self.keys, self.path)
        self.assertEqual(seen, ["load locked", "save locked"])
        self.assertTrue(self.lock_is_free())

    def test_lock_file_is_private(self) -> None:
        """The lock file next to the key file is created mode 0600."""
        with key_file_lock(self.path):
            pass
        self.assertEqual(os.stat(self.path + ".lock").st_mode & 0o777, 0o600)
