"""
End-to-end tests of ``pocketbridge-cli`` (docs/cli.md): the CLI runs as a
subprocess (``python -m pocketbridge.cli.main``), the way users run it, against a
real ``twistd pocketbridge`` process (``tests.harness``). The main flow
(pair, send, watch, devices, revoke) runs on SQLite and PostgreSQL; the
other cases on SQLite.

Each run gets its own ``XDG_CONFIG_HOME`` and no ``POCKETBRIDGE_URL`` from
the developer's shell, so nothing touches real key files.
"""

from __future__ import annotations

import base64
import os
import re
import sqlite3
import stat
import sys
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Tuple

import orjson
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from pocketbridge.client import Client, DeviceKeys
from tests.class_servers import class_server
from tests.harness import PostgresMixin, ServerProcess, SQLiteMixin, free_port, start_server

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

CLI_TIMEOUT = 60.0  # seconds one CLI run may take before the test kills it
STREAM = "clipboard:main"
ERROR_LINE = re.compile(r"^(pocketbridge-cli[^:]*: )?(usage error|error|rejected): ")
TYPE = "clipboard:text"


class CliResult(NamedTuple):
    """How one CLI run ended."""

    code: Optional[int]
    out: str
    err: str


class CliProcess(ProcessProtocol):
    """One ``pocketbridge-cli`` child: collects its output, lets a test wait for a pattern in it."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.code: Optional[int] = None
        self.process: Any = None  # the IProcessTransport: write answers, send signals
        self.ended: "Deferred[CliResult]" = Deferred()
        self._waiters: List[Tuple["re.Pattern[str]", "Deferred[re.Match[str]]"]] = []

    def outReceived(self, data: bytes) -> None:
        """Collect stdout; wake the waiters whose pattern now matches."""
        self.out += data
        for pattern, d in list(self._waiters):
            match = pattern.search(self.out.decode("utf-8", "replace"))
            if match is not None:
                self._waiters.remove((pattern, d))
                d.callback(match)

    def errReceived(self, data: bytes) -> None:
        """Collect stderr."""
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        """Record the exit code; fail the waiters still waiting."""
        if reason.check(ProcessDone, ProcessTerminated):
            self.code = reason.value.exitCode
        result = self.result()
        for _, d in self._waiters:
            d.errback(AssertionError("the CLI exited ({}) first; stdout {!r}, stderr {!r}".format(
                self.code, result.out, result.err)))
        self._waiters = []
        self.ended.callback(result)

    def result(self) -> CliResult:
        """Exit code and output so far."""
        return CliResult(self.code, self.out.decode("utf-8", "replace"), self.err.decode("utf-8", "replace"))

    def wait_for_stdout(self, pattern: str, timeout: float = CLI_TIMEOUT) -> "Deferred[re.Match[str]]":
        """The first match of ``pattern`` in stdout, now or once it is printed."""
        compiled = re.compile(pattern)
        match = compiled.search(self.out.decode("utf-8", "replace"))
        if match is not None:
            return succeed(match)
        d: "Deferred[re.Match[str]]" = Deferred()
        self._waiters.append((compiled, d))
        d.addTimeout(timeout, reactor)
        return d


class CliTestMixin(_Base):
    """Running the CLI; mixed with a backend and TestCase below."""

    backend = "sqlite"

    def cli_env(self, url: Optional[str] = None) -> Dict[str, str]:
        """The child's environment: private config dir, ``POCKETBRIDGE_URL`` only when given."""
        env = {k: v for k, v in os.environ.items() if k != "POCKETBRIDGE_URL"}
        env["XDG_CONFIG_HOME"] = self.home()
        if url is not None:
            env["POCKETBRIDGE_URL"] = url
        return env

    def home(self) -> str:
        """This test's directory for key files."""
        if not hasattr(self, "_home"):
            self._home = os.path.abspath(self.mktemp())
            os.makedirs(self._home)
        return self._home

    def path(self, name: str) -> str:
        """A key file path in this test's directory."""
        return os.path.join(self.home(), name)

    def start_cli(self, *args: str, stdin: bytes = b"", env: Optional[Dict[str, str]] = None,
                  terminal: bool = False) -> CliProcess:
        """
        Start ``python -m pocketbridge.cli.main ARGS`` with ``stdin`` as its whole
        input, or with ``terminal`` on a pseudo-terminal (stdout and stderr
        both arrive as stdout; write answers with ``proto.process.write``).
        """
        proto = CliProcess()
        argv = [sys.executable, "-m", "pocketbridge.cli.main", *args]
        transport = reactor.spawnProcess(proto, sys.executable, argv, env=env or self.cli_env(), path=self.home(),
                                         usePTY=terminal)
        proto.process = transport
        if not terminal:
            transport.write(stdin)
            transport.closeStdin()

        def kill_if_running() -> Optional["Deferred[None]"]:
            """
            Cleanup: a CLI still running when the test ends (failed or timed
            out) is killed, and the cleanup waits for it to be reaped so that
            its pipes do not leave the reactor dirty.
            """
            if proto.code is not None or proto.ended.called:
                return None
            reaped: "Deferred[None]" = Deferred()
            proto.ended.addBoth(lambda result: (reaped.callback(None), result)[1])
            try:
                transport.signalProcess("KILL")
            except OSError:
                pass
            return reaped

        self.addCleanup(kill_if_running)
        return proto

    async def cli(self, *args: str, stdin: bytes = b"", env: Optional[Dict[str, str]] = None) -> CliResult:
        """Run the CLI to the end (killed after ``CLI_TIMEOUT`` s)."""
        proto = self.start_cli(*args, stdin=stdin, env=env)
        d = proto.ended
        d.addTimeout(CLI_TIMEOUT, reactor)
        return await d

    async def ok(self, *args: str, stdin: bytes = b"") -> CliResult:
        """Run the CLI and assert exit status 0."""
        result = await self.cli(*args, stdin=stdin)
        self.assertEqual(result.code, 0, "pocketbridge-cli {} failed: {!r}".format(" ".join(args), result))
        return result

    def assertOneLineError(self, result: CliResult, code: int, text: str) -> None:
        """Exit ``code`` and exactly one stderr line, containing ``text``, after any progress lines."""
        self.assertEqual(result.code, code, result)
        errors = [line for line in result.err.splitlines() if ERROR_LINE.match(line)]
        self.assertEqual(len(errors), 1, result.err)
        self.assertIn(text, errors[0])
        self.assertEqual(result.err.splitlines()[-1], errors[0])
        self.assertNotIn("Traceback", result.err)

    async def two_devices(self, server: ServerProcess) -> Tuple[str, str]:
        """Key files of devices A and B of one new user (B copied with ``keygen --from``)."""
        a, b = self.path("a.json"), self.path("b.json")
        await self.ok("keygen", "--keys", a, "--name", "Laptop")
        await self.ok("keygen", "--keys", b, "--from", a, "--name", "Phone")
        return a, b

    def stored_payloads(self, server: ServerProcess) -> List[Tuple[int, str]]:
        """``(seq, encrypted_payload)`` of every stored event, read from the database."""
        query = "SELECT seq, encrypted_payload FROM events ORDER BY seq"
        if self.backend == "sqlite":
            conn = sqlite3.connect(os.path.join(server.data_dir, "pocketbridge.sqlite3"))
            try:
                return [(r[0], r[1]) for r in conn.execute(query)]
            finally:
                conn.close()
        import psycopg2

        pg = psycopg2.connect(server.database_url)
        try:
            with pg.cursor() as cur:
                cur.execute(query)
                return [(r[0], r[1]) for r in cur.fetchall()]
        finally:
            pg.close()


def ids(output: str) -> Dict[str, str]:
    """The ``key=value`` lines of a command's stdout."""
    return dict(line.split("=", 1) for line in output.splitlines() if re.match(r"^[a-z_]+=", line))


class CliMainFlow(CliTestMixin):
    """The flow of the issue, on one backend."""

    async def test_pair_send_watch_devices_revoke(self) -> None:
        """Pairing gives B the user key under a new device id; A's sends reach B's watch decrypted (only ciphertext stored), watch resumes, devices marks this device, a revoked B cannot send."""
        server = await start_server(self)
        a = self.path("a.json")
        await self.ok("keygen", "--keys", a, "--name", "Laptop")
        a_keys = DeviceKeys.load(a)

        # Pairing: A shows a code, B joins with it.
        pairing = self.start_cli("pair", "new", "--url", server.http_url, "--keys", a, "--yes")
        code = (await pairing.wait_for_stdout(r"code=([0-9]{6})")).group(1)
        b = self.path("phone.json")
        joined = await self.ok("pair", "join", code, "--url", server.ws_url, "--keys", b, "--name", "Phone", "--yes")
        paired = await pairing.ended
        self.assertEqual(paired.code, 0, paired)
        self.assertEqual(paired.out.splitlines()[-1], "paired")
        self.assertRegex(ids(paired.out)["verification"], r"^[0-9A-Z]{5}-[0-9A-Z]{5}$")
        self.assertEqual(ids(joined.out)["verification"], ids(paired.out)["verification"])
        b_keys = DeviceKeys.load(b)
        self.assertEqual(b_keys.user_id, a_keys.user_id)
        self.assertNotEqual(b_keys.device_id, a_keys.device_id)
        self.assertEqual(ids(joined.out)["device_id"], b_keys.device_id)
        self.assertEqual(stat.S_IMODE(os.stat(b).st_mode), 0o600)

        # End-to-end encrypted delivery.
        sent = await self.ok("send", "--url", server.http_url, "--keys", a, "--stream", STREAM, "--type", TYPE,
                             stdin=b"hello from the laptop")
        self.assertEqual(sent.out.strip(), "stored seq=1 stream_seq=1")
        watched = await self.ok("watch", "--url", server.http_url, "--keys", b, "--count", "1")
        self.assertEqual(watched.out, "seq=1 stream={} type={}\nhello from the laptop\n".format(STREAM, TYPE))
        [(seq, stored)] = self.stored_payloads(server)
        self.assertNotIn("hello", stored)
        self.assertNotIn(b"hello", base64.b64decode(stored))

        # The next watch gets only what is new.
        await self.ok("send", "--url", server.http_url, "--keys", a, "--stream", STREAM, "--type", TYPE,
                      stdin=b"second")
        watched = await self.ok("watch", "--url", server.http_url, "--keys", b, "--count", "1")
        self.assertEqual(watched.out, "seq=2 stream={} type={}\nsecond\n".format(STREAM, TYPE))

        listed = await self.ok("devices", "--url", server.http_url, "--keys", a)
        rows = listed.out.splitlines()[1:]
        self.assertEqual(len(rows), 2, listed.out)
        self.assertEqual([r for r in rows if r.startswith("*")], [r for r in rows if a_keys.device_id in r])
        self.assertIn("Phone", next(r for r in rows if b_keys.device_id in r))

        revoked = await self.ok("revoke", b_keys.device_id, "--url", server.http_url, "--keys", a)
        self.assertEqual(revoked.out.strip(), "revoked {}".format(b_keys.device_id))
        refused = await self.cli("send", "--url", server.http_url, "--keys", b, "--stream", STREAM, "--type", TYPE,
                                 stdin=b"after revocation")
        self.assertOneLineError(refused, 1, "revoked")
        self.assertEqual(len(self.stored_payloads(server)), 2)


class CliMainFlowSQLite(CliMainFlow, SQLiteMixin, TestCase):
    """The main flow on SQLite."""


class CliMainFlowPostgres(CliMainFlow, PostgresMixin, TestCase):
    """The main flow on PostgreSQL."""


class CliTests(CliTestMixin, SQLiteMixin, TestCase):
    """Single behaviours of the CLI, on SQLite."""

    async def test_keygen_writes_a_private_key_file_and_prints_ids(self) -> None:
        """keygen writes a 0600 key file, prints its user_id and device_id but never the seed, and will not overwrite it without --force."""
        path = self.path("dir/device.json")
        result = await self.ok("keygen", "--keys", path, "--name", "Laptop")
        keys = DeviceKeys.load(path)
        self.assertEqual(ids(result.out), {"user_id": keys.user_id, "device_id": keys.device_id})
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertNotIn(keys.identity.seed_hex, result.out + result.err)
        again = await self.cli("keygen", "--keys", path)
        self.assertOneLineError(again, 1, "refusing to overwrite")
        self.assertEqual(DeviceKeys.load(path).device_id, keys.device_id)
        copy = await self.ok("keygen", "--keys", self.path("second.json"), "--from", path)
        self.assertEqual(ids(copy.out)["user_id"], keys.user_id)
        self.assertNotEqual(ids(copy.out)["device_id"], keys.device_id)

    async def test_default_key_path_and_url_from_environment(self) -> None:
        """Without --keys the key file lives under $XDG_CONFIG_HOME/pocketbridge, and POCKETBRIDGE_URL (a ws:// URL) stands in for --url."""
        server = await class_server(self)
        await self.ok("keygen")
        self.assertTrue(os.path.exists(os.path.join(self.home(), "pocketbridge", "device.json")))
        result = await self.cli("devices", env=self.cli_env(server.ws_url))
        self.assertEqual(result.code, 0, result)
        self.assertEqual(len(result.out.splitlines()), 2)
        self.assertTrue(result.out.splitlines()[1].startswith("*"))

    async def test_watch_count_leaves_later_events_for_the_next_watch(self) -> None:
        """watch --count 2 prints the first two of three waiting events; the next watch prints the third and nothing twice."""
        server = await class_server(self)
        a, b = await self.two_devices(server)
        for text in (b"one", b"two", b"three"):
            await self.ok("send", "--url", server.http_url, "--keys", a, "--stream", STREAM, "--type", TYPE, stdin=text)
        first = await self.ok("watch", "--url", server.http_url, "--keys", b, "--count", "2")
        self.assertEqual(first.out.splitlines()[1::2], ["one", "two"])
        second = await self.ok("watch", "--url", server.http_url, "--keys", b, "--count", "1", "--raw")
        self.assertEqual(second.out, "three")
        self.assertEqual(DeviceKeys.load(b).last_received_seq, 3)

    async def test_watch_shows_undecryptable_events_and_goes_on(self) -> None:
        """An event another client sent without the payload key is shown as <not decryptable> (JSON: decrypted false) and the next event still prints."""
        server = await class_server(self)
        a, b = await self.two_devices(server)
        other = DeviceKeys.load(a).for_new_device("Old client")
        client = Client.for_device(reactor, server.ws_url, other)
        self.addCleanup(client.close)
        await client.connect()
        await client.send_event(STREAM, TYPE, base64.b64encode(b"plain text").decode("ascii"), timeout=10)
        await client.close()
        await self.ok("send", "--url", server.http_url, "--keys", a, "--stream", STREAM, "--type", TYPE,
                      stdin=b"\xff\xfebinary")
        text = await self.ok("watch", "--url", server.http_url, "--keys", b, "--count", "1")
        self.assertEqual(text.out, "seq=1 stream={} type={}\n<not decryptable>\n".format(STREAM, TYPE))
        as_json = await self.ok("watch", "--url", server.http_url, "--keys", b, "--count", "1", "--json")
        doc = orjson.loads(as_json.out)
        self.assertEqual((doc["seq"], doc["decrypted"], base64.b64decode(doc["base64"])), (2, True, b"\xff\xfebinary"))

    async def test_send_rejected_prints_the_typed_error(self) -> None:
        """An event the server answers with a typed error (a ttl in the past) prints `rejected: <code>: <message>` and exits 1; nothing is stored."""
        server = await start_server(self)
        a, _ = await self.two_devices(server)
        result = await self.cli("send", "--url", server.http_url, "--keys", a, "--stream", STREAM, "--type", TYPE,
                                "--expires-at", "1000", stdin=b"late")
        self.assertOneLineError(result, 1, "rejected: invalid_event: ")
        self.assertEqual(self.stored_payloads(server), [])

    async def test_status_reports_health_and_this_device(self) -> None:
        """status prints health ok, this device's ids, the pinned server key and the connection and presence counts."""
        server = await class_server(self)
        a, b = await self.two_devices(server)
        for path in (a, b):  # both register (one handshake each) and disconnect
            await self.ok("send", "--url", server.http_url, "--keys", path, "--stream", STREAM, "--type", TYPE,
                          stdin=b"x")
        result = await self.ok("status", "--url", server.ws_url, "--keys", a)
        keys = DeviceKeys.load(a)
        lines = dict(line.split(":", 1) for line in result.out.splitlines())
        self.assertTrue(lines["health"].strip().startswith("ok ("), result.out)
        self.assertEqual(lines["user_id"].strip(), keys.user_id)
        self.assertTrue(lines["device_id"].strip().startswith(keys.device_id))
        pin = keys.pinned_server_key(server.ws_url)
        self.assertIsNotNone(pin)
        self.assertIn(str(pin), lines["server key"])
        self.assertEqual(lines["presence"].strip(), "0 of 2 devices online")
        self.assertIn("0 of 2 devices connected", lines["connection"])

    async def test_bad_url_and_missing_key_file_fail_with_one_line(self) -> None:
        """A server that is not there, a malformed URL and a missing key file each give one error line and exit 1; no URL at all is a usage error (2)."""
        path = self.path("a.json")
        await self.ok("keygen", "--keys", path)
        nobody = "http://127.0.0.1:{}".format(free_port())
        down = await self.cli("send", "--url", nobody, "--keys", path, "--stream", STREAM, "--type", TYPE, stdin=b"x")
        self.assertOneLineError(down, 1, "connection refused")
        watch = await self.cli("watch", "--url", nobody, "--keys", path)
        self.assertOneLineError(watch, 1, "cannot connect")
        status = await self.cli("status", "--url", nobody, "--keys", path)
        self.assertOneLineError(status, 1, "connection refused")
        for url in ("ftp://127.0.0.1:3001", "127.0.0.1:3001", "ws://127.0.0.1:3001/other"):
            bad = await self.cli("devices", "--url", url, "--keys", path)
            self.assertOneLineError(bad, 1, "bad server URL")
        missing = await self.cli("devices", "--url", nobody, "--keys", self.path("none.json"))
        self.assertOneLineError(missing, 1, "no key file")
        no_url = await self.cli("status", "--keys", path)
        self.assertOneLineError(no_url, 2, "--url is required")

    async def test_revoke_refuses_this_device_without_self(self) -> None:
        """revoke of the current device is refused (exit 2) without --self and the device keeps working; with --self it is signed out."""
        server = await class_server(self)
        a, _ = await self.two_devices(server)
        this = DeviceKeys.load(a).device_id
        refused = await self.cli("revoke", this, "--url", server.http_url, "--keys", a)
        self.assertOneLineError(refused, 2, "--self")
        await self.ok("devices", "--url", server.http_url, "--keys", a)
        await self.ok("revoke", this[:8], "--self", "--url", server.http_url, "--keys", a)
        after = await self.cli("devices", "--url", server.http_url, "--keys", a)
        self.assertOneLineError(after, 1, "revoked")

    async def test_pair_join_keeps_an_existing_key_file(self) -> None:
        """pair join refuses to overwrite an existing key file before it contacts the server, and the file is unchanged."""
        path = self.path("a.json")
        await self.ok("keygen", "--keys", path)
        before = open(path, "rb").read()
        result = await self.cli("pair", "join", "123456", "--url", "http://127.0.0.1:{}".format(free_port()),
                                "--keys", path, "--yes")
        self.assertOneLineError(result, 1, "refusing to overwrite")
        self.assertEqual(open(path, "rb").read(), before)

    async def test_pair_needs_yes_without_a_terminal(self) -> None:
        """pair new with stdin that is not a terminal and no --yes is a usage error: nobody could confirm the verification string."""
        path = self.path("a.json")
        await self.ok("keygen", "--keys", path)
        result = await self.cli("pair", "new", "--url", "http://127.0.0.1:{}".format(free_port()), "--keys", path)
        self.assertOneLineError(result, 2, "--yes")

    async def test_pair_new_asks_on_a_terminal(self) -> None:
        """On a terminal pair new asks whether both devices show the verification string: "n" sends nothing (the new device writes no key file), "y" pairs."""
        server = await class_server(self)
        a = self.path("a.json")
        await self.ok("keygen", "--keys", a)
        for answer in ("n", "y"):
            pairing = self.start_cli("pair", "new", "--url", server.http_url, "--keys", a, terminal=True)
            code = (await pairing.wait_for_stdout(r"code=([0-9]{6})")).group(1)
            b = self.path("b-{}.json".format(answer))
            joining = self.start_cli("pair", "join", code, "--url", server.http_url, "--keys", b, "--yes",
                                     "--timeout", "4")
            question = await pairing.wait_for_stdout(r"Do both devices show ([0-9A-Z]{5}-[0-9A-Z]{5})\? \[y/N\]")
            pairing.process.write(answer.encode("ascii") + b"\n")
            asked, joined = await pairing.ended, await joining.ended
            self.assertEqual(ids(joined.out)["verification"], question.group(1))
            if answer == "n":
                self.assertEqual(asked.code, 1, asked)
                self.assertIn("not confirmed; nothing was sent", asked.out)
                self.assertOneLineError(joined, 1, "timed out")
                self.assertFalse(os.path.exists(b))
            else:
                self.assertEqual(asked.code, 0, asked)
                self.assertRegex(asked.out, r"(?m)^paired\r?$")
                self.assertEqual(joined.code, 0, joined)
                self.assertEqual(DeviceKeys.load(b).user_id, DeviceKeys.load(a).user_id)

    async def test_changed_server_key_stops_until_accepted(self) -> None:
        """When the pinned server key differs from the server's, send fails with one line naming both keys; --server-key with the new key sends and re-pins it."""
        server = await start_server(self)
        a, _ = await self.two_devices(server)
        await self.ok("send", "--url", server.http_url, "--keys", a, "--stream", STREAM, "--type", TYPE, stdin=b"1")
        keys = DeviceKeys.load(a)
        real = keys.pinned_server_key(server.ws_url)
        assert real is not None
        keys.pin_server_key(server.ws_url, "11" * 32)
        keys.save(a)
        refused = await self.cli("send", "--url", server.http_url, "--keys", a, "--stream", STREAM, "--type", TYPE,
                                 stdin=b"2")
        self.assertOneLineError(refused, 1, "server key of 127.0.0.1:{} changed".format(server.port))
        self.assertIn(real, refused.err)
        await self.ok("send", "--url", server.http_url, "--keys", a, "--stream", STREAM, "--type", TYPE,
                      "--server-key", real, stdin=b"3")
        self.assertEqual(DeviceKeys.load(a).pinned_server_key(server.ws_url), real)
        self.assertEqual(len(self.stored_payloads(server)), 2)

    async def test_watch_reconnects_after_a_server_restart_and_saves_on_interrupt(self) -> None:
        """watch survives a server restart (it reconnects and prints what is sent afterwards), and SIGTERM ends it with status 130 after saving the resume point."""
        server = await start_server(self)
        a, b = await self.two_devices(server)
        await self.ok("send", "--url", server.http_url, "--keys", a, "--stream", STREAM, "--type", TYPE,
                      stdin=b"before restart")
        watching = self.start_cli("watch", "--url", server.http_url, "--keys", b)
        await watching.wait_for_stdout("before restart")
        await server.restart()
        await self.ok("send", "--url", server.http_url, "--keys", a, "--stream", STREAM, "--type", TYPE,
                      stdin=b"after restart")
        await watching.wait_for_stdout("after restart")
        watching.process.signalProcess("TERM")
        result = await watching.ended
        self.assertEqual(result.code, 130, result)
        self.assertIn("reconnecting in", result.err)
        self.assertEqual(result.err.splitlines()[-1], "interrupted")
        self.assertEqual(result.out.count("restart"), 2)
        self.assertEqual(DeviceKeys.load(b).last_received_seq, 2)

    async def test_watch_and_send_share_a_key_file(self) -> None:
        """A send on the device while its watch runs keeps its reserved device_seq in the key file when the watch later saves its resume point."""
        server = await class_server(self)
        a, b = await self.two_devices(server)
        watching = self.start_cli("watch", "--url", server.http_url, "--keys", a)
        await self.ok("send", "--url", server.http_url, "--keys", a, "--stream", STREAM, "--type", TYPE, stdin=b"A")
        self.assertEqual(DeviceKeys.load(a).next_device_seq, 2)
        await self.ok("send", "--url", server.http_url, "--keys", b, "--stream", STREAM, "--type", TYPE, stdin=b"B")
        await watching.wait_for_stdout("seq=2 ")
        watching.process.signalProcess("TERM")
        self.assertEqual((await watching.ended).code, 130)
        keys = DeviceKeys.load(a)
        self.assertEqual((keys.next_device_seq, keys.last_received_seq), (2, 2))
