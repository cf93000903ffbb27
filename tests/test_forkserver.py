"""
The fork server the harness starts test servers through (tests/forkserver.py):
a forked child behaves as the exec'd ``twistd`` it replaces.
"""

from __future__ import annotations

import os
import signal

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import forkserver
from tests.harness import ServerProcess


class ForkedProcessTests(SynchronousTestCase):
    """Exit codes, output files, working directory, environment and signals, as with ``subprocess.Popen``."""

    def spawn(self, *argv: str, env: dict = {}) -> "tuple[forkserver.ForkedProcess, str]":
        directory = self.mktemp()
        os.makedirs(directory)
        process = forkserver.ForkedProcess(
            list(argv), cwd=directory, env=dict(env, PATH=os.environ.get("PATH", "")),
            stdout=os.path.join(directory, "stdout"), stderr=os.path.join(directory, "stderr"),
        )
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait(10)))
        return process, directory

    def test_output_goes_to_the_files_and_the_exit_code_is_reported(self) -> None:
        """``twistd --version`` exits 0 with its banner in the stdout file."""
        process, directory = self.spawn("--version")
        self.assertEqual(process.wait(30), 0)
        with open(os.path.join(directory, "stdout")) as f:
            self.assertIn("twistd (the Twisted daemon)", f.read())

    def test_a_usage_error_exits_1_with_the_message_on_stderr_or_stdout(self) -> None:
        """An unknown option ends the child with twistd's own exit status and text."""
        process, directory = self.spawn("--no-such-option")
        self.assertEqual(process.wait(30), 1)
        with open(os.path.join(directory, "stdout")) as out, open(os.path.join(directory, "stderr")) as err:
            self.assertIn("no-such-option", out.read() + err.read())

    def test_a_signal_is_a_negative_return_code_and_the_child_leads_its_session(self) -> None:
        """A running server forked for us is in its own session; SIGKILL shows as -9, as from Popen."""
        process, directory = self.spawn("-n", "--pidfile=", "--logfile=" + "log", "pocketbridge",
                                        "--listen", "tcp:0:interface=127.0.0.1", "--data-dir", "data")
        self.assertIsNone(process.poll())
        self.assertEqual(os.getsid(process.pid), process.pid)
        process.send_signal(signal.SIGKILL)
        self.assertEqual(process.wait(30), -signal.SIGKILL)
        process.send_signal(signal.SIGTERM)  # after the exit: a no-op, never a stray kill


class HarnessUsesItTests(TestCase):
    """The harness starts ``ServerProcess`` through the fork server and exec's wrapped commands."""

    async def test_a_server_started_by_the_harness_is_a_forked_child_and_stops_cleanly(self) -> None:
        """The environment given to the harness reaches the forked server (here: a log level only env sets)."""
        server = ServerProcess(env={"LOG_LEVEL": "debug"})
        self.addCleanup(server.cleanup)
        await server.start()
        if forkserver.enabled():
            self.assertIsInstance(server.process, forkserver.ForkedProcess)
        code, _ = await server.http_get("/health")
        self.assertEqual(code, 200)
        self.assertEqual(await server.stop(), -signal.SIGTERM)
        self.assertIn("#debug]", server.log_text())
