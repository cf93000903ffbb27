"""
Token buckets (PROTOCOL.md §12), settings resolution (command line >
environment > default) and the server identity key.
"""

from __future__ import annotations

import os
import stat
from typing import Dict, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from pocketbridge.server import config
from pocketbridge.server.config import ConfigError, resolve
from pocketbridge.server.keys import KEY_FILE, load_server_key
from pocketbridge.server.buckets import BucketMap, TokenBucket

SERVER_SEED_HEX = "22" * 32
SERVER_PUB_HEX = "a09aa5f47a6759802ff955f8dc2d2a14a5c99d23be97f864127ff9383455a4f0"


class TokenBucketTests(SynchronousTestCase):
    """A bucket of ``burst`` tokens refilled at ``rate`` per second on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.bucket = TokenBucket(rate=2.0, burst=5, now=self.clock.seconds)

    def test_starts_full(self) -> None:
        """A new bucket allows a whole burst at once."""
        self.assertEqual([self.bucket.try_take() for _ in range(5)], [0.0] * 5)

    def test_empty_bucket_says_how_long_to_wait(self) -> None:
        """After the burst, the next take waits 1/rate seconds and takes nothing."""
        for _ in range(5):
            self.bucket.try_take()
        self.assertEqual(self.bucket.try_take(), 0.5)
        self.assertEqual(self.bucket.try_take(), 0.5)  # a refused take did not consume

    def test_refills_at_rate(self) -> None:
        """Half a second at rate 2 gives back exactly one token."""
        for _ in range(5):
            self.bucket.try_take()
        self.clock.advance(0.5)
        self.assertEqual(self.bucket.try_take(), 0.0)
        self.assertGreater(self.bucket.try_take(), 0.0)

    def test_refill_capped_at_burst(self) -> None:
        """A long idle time refills to the burst, not beyond."""
        self.bucket.try_take()
        self.clock.advance(3600)
        self.assertEqual([self.bucket.try_take() for _ in range(5)], [0.0] * 5)
        self.assertGreater(self.bucket.try_take(), 0.0)

    def test_oversized_item_passes_when_full_then_owes(self) -> None:
        """An item larger than the burst passes a full bucket; the debt then delays the next item."""
        self.assertEqual(self.bucket.wait_for(12), 0.0)
        self.bucket.take(12)
        # 12 taken from 5: 7 in debt, so one more token needs (7 + 1) / 2 seconds.
        self.assertEqual(self.bucket.wait_for(1), 4.0)
        self.clock.advance(4.0)
        self.assertEqual(self.bucket.try_take(1), 0.0)

    def test_partial_wait(self) -> None:
        """Waiting for 3 tokens with 1 left at rate 2 takes one second."""
        for _ in range(4):
            self.bucket.try_take()
        self.assertEqual(self.bucket.wait_for(3), 1.0)

    def test_bucket_map_sweeps_only_full_buckets(self) -> None:
        """sweep forgets refilled buckets and keeps ones still owed tokens."""
        buckets: BucketMap[str] = BucketMap(rate=1.0, burst=2, now=self.clock.seconds)
        buckets.get("a").try_take()
        buckets.get("b")
        buckets.sweep()
        self.assertEqual(sorted(buckets.buckets), ["a"])
        self.clock.advance(1.0)
        buckets.sweep()
        self.assertEqual(sorted(buckets.buckets), [])

    def test_bucket_map_keys_independent(self) -> None:
        """Emptying one key's bucket does not limit another key."""
        buckets: BucketMap[str] = BucketMap(rate=1.0, burst=1, now=self.clock.seconds)
        buckets.get("1.2.3.4").try_take()
        self.assertGreater(buckets.get("1.2.3.4").try_take(), 0.0)
        self.assertEqual(buckets.get("5.6.7.8").try_take(), 0.0)


class ResolveTests(SynchronousTestCase):
    """``config.resolve``: command line > environment > default."""

    def assertConfigError(self, cli: Dict[str, Optional[str]], env: Dict[str, str], *names: str) -> str:
        """resolve fails with a ConfigError whose message names one of ``names``."""
        err = self.assertRaises(ConfigError, resolve, cli, env)
        message = str(err)
        self.assertTrue(any(name in message for name in names), "{!r} names none of {}".format(message, names))
        return message

    def test_defaults(self) -> None:
        """With nothing set, the §12 defaults apply."""
        s = resolve({}, {})
        self.assertEqual(
            (s.listen, s.max_message_bytes, s.max_payload_bytes, s.max_user_bytes, s.session_max_age,
             s.handshake_timeout, s.events_per_device_rate, s.events_per_device_burst, s.v1_unacked_tracked),
            ("tcp:3001", 16 * 2**20, 12 * 2**20, 2 * 2**30, 86400.0, 30.0, 100.0, 500, 10000),
        )
        self.assertFalse(s.require_v2)

    def test_env_overrides_default(self) -> None:
        """An environment variable replaces the default."""
        self.assertEqual(resolve({}, {"PB_MAX_MESSAGE_BYTES": "20000000"}).max_message_bytes, 20000000)

    def test_cli_overrides_env(self) -> None:
        """A command-line value wins over the environment."""
        s = resolve(
            {"max_message_bytes": "30000000", "log_level": "debug"},
            {"PB_MAX_MESSAGE_BYTES": "20000000", "LOG_LEVEL": "error"},
        )
        self.assertEqual((s.max_message_bytes, s.log_level), (30000000, "debug"))

    def test_cli_hides_bad_env(self) -> None:
        """A malformed environment value overridden on the command line is not an error."""
        self.assertEqual(resolve({"max_message_bytes": "20000000"}, {"PB_MAX_MESSAGE_BYTES": "abc"}).max_message_bytes, 20000000)

    def test_cli_none_falls_through(self) -> None:
        """A command-line option left at None does not hide the environment."""
        self.assertEqual(resolve({"log_level": None}, {"LOG_LEVEL": "warning"}).log_level, "warn")

    def test_port_env_sets_listen(self) -> None:
        """PORT=8080 listens on tcp:8080; --listen still wins over PORT."""
        self.assertEqual(resolve({}, {"PORT": "8080"}).listen, "tcp:8080")
        self.assertEqual(resolve({"listen": "tcp:9000"}, {"PORT": "8080"}).listen, "tcp:9000")

    def test_bad_port_env(self) -> None:
        """PORT that is not a port number 1–65535 is refused naming PORT."""
        for bad in ("abc", "0", "65536", "-1", "80 ", "tcp:80"):
            self.assertConfigError({}, {"PORT": bad}, "PORT")

    def test_flags(self) -> None:
        """Boolean settings accept 1/0/true/false/yes/no/on/off from the environment."""
        self.assertTrue(resolve({}, {"PB_REQUIRE_V2": "yes"}).require_v2)
        self.assertFalse(resolve({}, {"PB_REQUIRE_V2": "off"}).require_v2)

    def test_bad_env_values_name_the_variable(self) -> None:
        """Each malformed environment value fails with a ConfigError naming its variable."""
        cases = {
            "PB_MAX_MESSAGE_BYTES": ["abc", "0", "-5", "1.5", ""],
            "PB_MAX_PREAUTH_MESSAGES": ["-1", "x"],
            "PB_SESSION_MAX_AGE": ["0", "-1", "nan", "inf", "soon"],
            "PB_REQUIRE_V2": ["maybe"],
            "PB_LEGACY_CLIENTS": ["2"],
            "DATABASE_URL": ["mysql://db/x", "sqlite:///tmp/x"],
            "REDIS_URL": ["http://x", "redis://", "redis://h:99999"],
            "LOG_LEVEL": ["loud"],
            "PB_WRITER_DELAY_MS": ["-1"],
            "PB_EVENTS_PER_USER_RATE": ["0"],
        }
        for var, values in cases.items():
            for value in values:
                message = self.assertConfigError({}, {var: value}, var)
                self.assertFalse(message.startswith("--"), message)

    def test_bad_cli_values_name_the_option(self) -> None:
        """A malformed command-line value fails with a ConfigError naming the --option."""
        self.assertConfigError({"max_message_bytes": "abc"}, {}, "--max-message-bytes")
        self.assertConfigError({"session_max_age": "-3"}, {}, "--session-max-age")
        self.assertConfigError({"database": "mysql://x"}, {"DATABASE_URL": "postgresql://ok/db"}, "--database")

    def test_cross_checks_name_a_setting(self) -> None:
        """Inconsistent settings (payload limit too close to message limit, heartbeat) name the setting."""
        self.assertConfigError({}, {"PB_MAX_PAYLOAD_BYTES": str(16 * 2**20)}, "max-payload-bytes", "PB_MAX_PAYLOAD_BYTES")
        self.assertConfigError({}, {"PB_HEARTBEAT_TIMEOUT": "10"}, "heartbeat-timeout", "PB_HEARTBEAT_TIMEOUT")
        self.assertConfigError(
            {"max_preauth_message_bytes": str(32 * 2**20)}, {}, "max-preauth-message-bytes"
        )

    def test_long_bad_value_redacted(self) -> None:
        """A bad value longer than 80 characters is cut in the error message."""
        message = self.assertConfigError({}, {"PB_MAX_MESSAGE_BYTES": "9" * 70 + "x" * 200}, "PB_MAX_MESSAGE_BYTES")
        self.assertLess(len(message), 200)

    def test_every_setting_has_env_or_is_listen(self) -> None:
        """Every setting except listen (PORT) can be set from the environment, each under its own name."""
        envs = [s.env for s in config.SETTINGS if s.name != "listen"]
        self.assertNotIn(None, envs)
        self.assertEqual(len(envs), len(set(envs)))

    def test_replace(self) -> None:
        """Settings.replace changes one value and refuses an unknown name."""
        s = resolve({}, {}).replace(max_user_bytes=10)
        self.assertEqual(s.max_user_bytes, 10)
        self.assertRaises(KeyError, s.replace, no_such_setting=1)


class ServerKeyTests(SynchronousTestCase):
    """``keys.load_server_key``: environment pair, or generated once in the data dir."""

    def setUp(self) -> None:
        self.data_dir = self.mktemp()

    def test_generated_once_with_mode_0600(self) -> None:
        """Without env keys a key file is created with mode 0600 and reloaded unchanged."""
        first = load_server_key(self.data_dir, {})
        path = os.path.join(self.data_dir, KEY_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        second = load_server_key(self.data_dir, {})
        self.assertEqual(bytes(second.verify_key), bytes(first.verify_key))

    def test_key_file_holds_no_more_than_the_seed(self) -> None:
        """The key file holds the hex seed of the key that was returned."""
        key = load_server_key(self.data_dir, {})
        with open(os.path.join(self.data_dir, KEY_FILE)) as f:
            self.assertEqual(f.read().strip(), bytes(key).hex())

    def test_env_seed(self) -> None:
        """SERVER_PRIVATE_KEY_HEX alone (a seed) gives that key and writes no file."""
        key = load_server_key(self.data_dir, {"SERVER_PRIVATE_KEY_HEX": SERVER_SEED_HEX})
        self.assertEqual(bytes(key.verify_key).hex(), SERVER_PUB_HEX)
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, KEY_FILE)))

    def test_env_pair_matching(self) -> None:
        """A matching private/public pair is accepted, in either case, and seed‖public as 128 hex too."""
        key = load_server_key(
            self.data_dir, {"SERVER_PRIVATE_KEY_HEX": SERVER_SEED_HEX, "SERVER_PUBLIC_KEY_HEX": SERVER_PUB_HEX.upper()}
        )
        self.assertEqual(bytes(key.verify_key).hex(), SERVER_PUB_HEX)
        key = load_server_key(self.data_dir, {"SERVER_PRIVATE_KEY_HEX": SERVER_SEED_HEX + SERVER_PUB_HEX})
        self.assertEqual(bytes(key.verify_key).hex(), SERVER_PUB_HEX)

    def test_env_pair_mismatch_refused(self) -> None:
        """A public key that does not belong to the private key is refused naming SERVER_PUBLIC_KEY_HEX."""
        err = self.assertRaises(
            ConfigError,
            load_server_key,
            self.data_dir,
            {"SERVER_PRIVATE_KEY_HEX": SERVER_SEED_HEX, "SERVER_PUBLIC_KEY_HEX": "00" * 32},
        )
        self.assertIn("SERVER_PUBLIC_KEY_HEX", str(err))

    def test_128_hex_mismatch_refused(self) -> None:
        """seed‖public whose public half is wrong is refused naming SERVER_PRIVATE_KEY_HEX."""
        err = self.assertRaises(
            ConfigError, load_server_key, self.data_dir, {"SERVER_PRIVATE_KEY_HEX": SERVER_SEED_HEX + "00" * 32}
        )
        self.assertIn("SERVER_PRIVATE_KEY_HEX", str(err))

    def test_public_without_private_refused(self) -> None:
        """SERVER_PUBLIC_KEY_HEX without SERVER_PRIVATE_KEY_HEX is refused, and no key is generated."""
        err = self.assertRaises(ConfigError, load_server_key, self.data_dir, {"SERVER_PUBLIC_KEY_HEX": SERVER_PUB_HEX})
        self.assertIn("SERVER_PUBLIC_KEY_HEX", str(err))
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, KEY_FILE)))

    def test_malformed_private_refused_without_echo(self) -> None:
        """A malformed private key is refused and its value does not appear in the message."""
        secret = "ab" * 31 + "zz"
        err = self.assertRaises(ConfigError, load_server_key, self.data_dir, {"SERVER_PRIVATE_KEY_HEX": secret})
        self.assertIn("SERVER_PRIVATE_KEY_HEX", str(err))
        self.assertNotIn(secret, str(err))

    def test_corrupt_key_file_refused(self) -> None:
        """A key file that is not a hex seed stops startup with a ConfigError, not a traceback."""
        os.makedirs(self.data_dir)
        with open(os.path.join(self.data_dir, KEY_FILE), "w") as f:
            f.write("abcd\n")
        self.assertRaises(ConfigError, load_server_key, self.data_dir, {})
