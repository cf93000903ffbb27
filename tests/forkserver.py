"""
A fork server for the test servers: one helper process per trial worker
imports twistd and the server's modules once, then forks a child for each
``twistd pocketbridge`` the harness starts.

Why: a server start spends most of its ~0.6 s of CPU importing (Autobahn,
Klein, OpenSSL, psycopg2, the server package), and the suite starts a few
hundred servers. The child is still a real ``twistd`` process: it runs
``twisted.scripts.twistd.run()`` with the test's argv, in its own session,
working directory and environment, with stdout and stderr on the test's
files; only the imports were done before the fork. The helper installs no
reactor and starts no thread before forking (``_preload`` checks both).

Protocol on the helper's stdin/stdout, one JSON object per line:

- harness -> helper: ``{"argv": [...], "cwd": ..., "env": {...}, "stdout": path, "stderr": path}``
- helper -> harness: ``{"pid": N}`` once forked, then ``{"exit": N, "code": C}``
  when the child ends (``C`` as ``subprocess.Popen.returncode``: negative
  for a signal).

``ForkedProcess`` gives the harness the part of ``subprocess.Popen`` it
uses (``pid``, ``poll``, ``wait``, ``send_signal``, ``kill``,
``returncode``). ``PB_TEST_FORKSERVER=0`` makes the harness exec each
server instead.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

#: What the helper imports before its first fork: what ``twistd pocketbridge`` imports.
PRELOAD = (
    "twisted.scripts.twistd",
    "twisted.application.app",
    "pocketbridge.server.tap",
    "pocketbridge.server.supervisor",
    "pocketbridge.server.workers",
)


def enabled() -> bool:
    """Whether the harness starts servers through the fork server (the default)."""
    return os.environ.get("PB_TEST_FORKSERVER", "1") != "0"


# ------------------------------------------------------------------ helper side


def _preload() -> None:
    import importlib
    import threading

    for name in PRELOAD:
        importlib.import_module(name)
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    list(getPlugins(IServiceMaker))  # read the plugin cache once
    if "twisted.internet.reactor" in sys.modules:
        raise RuntimeError("forkserver: a preloaded module installed the reactor; cannot fork safely")
    if threading.active_count() != 1:
        raise RuntimeError("forkserver: a preloaded module started a thread; cannot fork safely")


def _child(request: Dict[str, Any], ready: int) -> None:
    """
    In the forked child: become the server process described by ``request``.
    Writes to ``ready`` once it leads its own session. Never returns.
    """
    code = 1
    try:
        os.setsid()
        os.write(ready, b".")
        os.close(ready)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        stdin = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        for fd, target in ((stdin, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.closerange(3, 1024)
        # As a fresh interpreter with PYTHONUNBUFFERED=1 (the harness sets it).
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=True)
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True, errors="backslashreplace"
        )
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["twistd"] + list(request["argv"])
        from twisted.scripts.twistd import run

        try:
            run()
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _write(fd: int, message: Dict[str, Any]) -> None:
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(fd, data):]


def serve() -> None:
    """The helper's main loop: fork on each request, report each child's end."""
    _preload()
    requests_fd, replies_fd = 0, 1
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signo, frame: None)
    children: set = set()
    buffered = b""
    while True:
        try:
            readable, _, _ = select.select([requests_fd, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in readable:
            os.read(wake_r, 4096)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            _write(replies_fd, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if requests_fd in readable:
            chunk = os.read(requests_fd, 65536)
            if not chunk:  # the harness went away: leave the servers to its cleanup
                return
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                request = json.loads(line)
                ready_r, ready_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(ready_r)
                    _child(request, ready_w)
                os.close(ready_w)
                os.read(ready_r, 1)  # the pid is reported once the child leads its session (or is gone)
                os.close(ready_r)
                children.add(pid)
                _write(replies_fd, {"pid": pid})


# ------------------------------------------------------------------ harness side


class _Helper:
    """The fork server process of this (trial worker) process."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from tests.forkserver import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            start_new_session=True,
        )
        assert self.process.stdout is not None
        self._out = self.process.stdout.fileno()
        os.set_blocking(self._out, False)
        self._buffer = b""
        self._eof = False
        self.exits: Dict[int, int] = {}

    def alive(self) -> bool:
        return not self._eof and self.process.poll() is None

    def spawn(self, argv: List[str], cwd: str, env: Dict[str, str], stdout: str, stderr: str) -> int:
        assert self.process.stdin is not None
        # Paths relative to this process's directory: the helper has its own.
        request = {"argv": argv, "cwd": os.path.abspath(cwd), "env": env,
                   "stdout": os.path.abspath(stdout), "stderr": os.path.abspath(stderr)}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + 30
        while True:
            for message in self._read(max(0.0, deadline - time.monotonic())):
                if "pid" in message:
                    return int(message["pid"])
            if time.monotonic() >= deadline or not self.alive():
                raise RuntimeError("forkserver: no answer to a start request")

    def drain(self, timeout: float = 0.0) -> None:
        """Record the exits reported so far (waiting at most ``timeout`` s for the next report)."""
        for _ in self._read(timeout):
            pass

    def _read(self, timeout: float) -> List[Dict[str, Any]]:
        readable, _, _ = select.select([self._out], [], [], timeout)
        if readable:
            try:
                chunk = os.read(self._out, 65536)
                self._eof = not chunk
            except BlockingIOError:
                chunk = b""
            self._buffer += chunk
        messages = []
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            if "exit" in message:
                self.exits[int(message["exit"])] = int(message["code"])
            messages.append(message)
        return messages

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_helper: Optional[_Helper] = None


def _get_helper() -> _Helper:
    global _helper
    if _helper is None or not _helper.alive():
        _helper = _Helper()
    return _helper


@atexit.register
def _close_helper() -> None:
    # Registered when this module is imported, i.e. before the harness's and the
    # class servers' exit handlers, so it runs after them (atexit is LIFO): they
    # still get their servers' exit reports.
    if _helper is not None:
        _helper.close()


class ForkedProcess:
    """A server started by the fork server, driven like ``subprocess.Popen``."""

    def __init__(self, argv: List[str], cwd: str, env: Dict[str, str], stdout: str, stderr: str) -> None:
        self._helper = _get_helper()
        self.pid = self._helper.spawn(argv, cwd, env, stdout, stderr)
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self._helper.drain()
            self.returncode = self._helper.exits.pop(self.pid, None)
        if self.returncode is None and not self._helper.alive():
            # The helper is gone, so no report will come: alive or not is all we can know.
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.returncode = -signal.SIGKILL  # exit status unknown
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = 0.1 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired("twistd", timeout or 0)
            self._helper.drain(min(left, 0.1))
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a pid the helper already reported
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # ended; its report is on the way
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
