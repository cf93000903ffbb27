"""
The client alone: the project's wheel installed *without* the ``server``
extra (setup.cfg) into a fresh virtualenv has none of the server-only
packages, imports the whole SDK and CLI, runs ``pocketbridge-cli`` against a
real server, and makes ``twistd pocketbridge`` say in one line what to
install (README, docs/operations.md "The server extra").

The wheel is built from a copy of the sources (nothing is written into the
checkout) and installed by pip with its ordinary configuration, so the client
requirements come from the package index; the virtualenv is made once per
trial run and shared by the tests below, across trial workers. The server runs from the
project's own environment, as in every other integration test
(``tests.harness``). Nothing here skips: CI must prove the light install.
``MissingServerDependencies`` checks the same one-line refusal in memory.
"""

from __future__ import annotations

import atexit
import configparser
import fcntl
import io
import os
import re
import shutil
import sys
import tempfile
from typing import Dict, List, NamedTuple, Optional

import orjson
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pocketbridge.server import tap
from pocketbridge.server.tap import SERVER_INSTALL_HINT, SERVER_MODULES
from tests.harness import start_server

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the wheel is built from: the files the Dockerfile copies.
SOURCES = ("pyproject.toml", "setup.cfg", "setup.py", "README.md", "pocketbridge", "schema", "twisted")
BUILD_TIMEOUT = 240.0  # seconds for building the wheel and installing it with its requirements
RUN_TIMEOUT = 60.0  # seconds one command of the installed package may take
STREAM = "clipboard:main"
TYPE = "clipboard:text"

# Checked inside the client-only virtualenv: the server-only distributions
# and modules are absent, every SDK and CLI module imports, and the
# package comes from the virtualenv, not from the checkout.
_INSPECT = r"""
import importlib, importlib.metadata, importlib.util, pkgutil, sys
import orjson
dists, modules = orjson.loads(sys.argv[1])
import pocketbridge, pocketbridge.client
names = ["pocketbridge.cli.main", "pocketbridge.cli.commands", "pocketbridge.cli.pair", "pocketbridge.cli.support",
         "pocketbridge.cli.watch", "pocketbridge.protocol.crypto", "pocketbridge.server.keys", "pocketbridge.protocol.wire"]
names += [m.name for m in pkgutil.walk_packages(pocketbridge.client.__path__, "pocketbridge.client.")]
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = "{}: {}".format(type(e).__name__, e)
present = []
for dist in dists:
    try:
        importlib.metadata.distribution(dist)
        present.append(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
print(orjson.dumps({
    "package": pocketbridge.__file__,
    "prefix": sys.prefix,
    "imported": names,
    "failed": failed,
    "present_dists": present,
    "present_modules": [m for m in modules if importlib.util.find_spec(m) is not None],
}).decode())
"""


class Run(NamedTuple):
    """How one command ended."""

    code: Optional[int]
    out: str
    err: str


class _Collect(ProcessProtocol):
    """Collects a child's output; ``ended`` fires with its ``Run``."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: "Deferred[Run]" = Deferred()

    def outReceived(self, data: bytes) -> None:
        """Collect stdout."""
        self.out += data

    def errReceived(self, data: bytes) -> None:
        """Collect stderr."""
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        """Fire ``ended`` with the exit code (None when killed by a signal)."""
        code = reason.value.exitCode if reason.check(ProcessDone, ProcessTerminated) else None
        self.ended.callback(Run(code, self.out.decode("utf-8", "replace"), self.err.decode("utf-8", "replace")))


def _clean_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This process's environment without anything that points Python or the CLI elsewhere."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "POCKETBRIDGE_URL", "PIP_REQUIRE_VIRTUALENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra or {})
    return env


async def run(argv: List[str], cwd: str, env: Dict[str, str], stdin: bytes = b"",
              timeout: float = RUN_TIMEOUT) -> Run:
    """Run ``argv`` to its end with ``stdin`` as its whole input; killed after ``timeout`` seconds."""
    proto = _Collect()
    transport = reactor.spawnProcess(proto, argv[0], argv, env=env, path=cwd)
    transport.write(stdin)
    transport.closeStdin()

    def kill(result: object, seconds: float) -> Failure:
        try:
            transport.signalProcess("KILL")
        except Exception:  # it ended meanwhile
            pass
        return Failure(AssertionError("{} did not end within {} s".format(" ".join(argv), seconds)))

    d = proto.ended
    d.addTimeout(timeout, reactor, onTimeoutCancel=kill)
    return await d


def server_extra() -> List[str]:
    """The distribution names of the ``server`` extra in setup.cfg, lowercased."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(CHECKOUT, "setup.cfg"))
    lines = cfg.get("options.extras_require", "server").strip().splitlines()
    return [re.split(r"[^A-Za-z0-9_.-]", line.strip(), maxsplit=1)[0].lower() for line in lines if line.strip()]


_venv: Optional[str] = None  # the client-only virtualenv of this test process, once built


def _run_directory() -> Optional[str]:
    """
    The ``_trial_temp`` directory of this trial run (it holds ``_trial_marker``;
    a ``-j`` worker runs in a numbered directory below it), or None. Trial
    empties it at the start of every run, so what is built there is fresh.
    """
    here = os.getcwd()
    for candidate in (here, os.path.dirname(here)):
        if os.path.exists(os.path.join(candidate, "_trial_marker")):
            return candidate
    return None


async def client_only_venv() -> str:
    """
    A fresh virtualenv holding the wheel without extras, built once per trial
    run: the first trial worker that needs it builds it in the run's
    ``_trial_temp`` under an ``flock`` while the others wait for the lock,
    then all share it (outside trial: once per process, in a temporary
    directory).
    """
    global _venv
    if _venv is not None:
        return _venv
    run_dir = _run_directory()
    if run_dir is None:
        top = tempfile.mkdtemp(prefix="pb-client-only-")
        atexit.register(shutil.rmtree, top, True)
        _venv = await _build_client_only_venv(top)
        return _venv
    top = os.path.join(run_dir, "client-only")
    lock = os.open(os.path.join(run_dir, "client-only.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # Another worker may be building: wait for the lock without blocking the reactor.
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await deferLater(reactor, 0.2, lambda: None)
        done = os.path.join(top, "built")
        if not os.path.exists(done):
            shutil.rmtree(top, ignore_errors=True)  # a build that failed half-way
            os.makedirs(top)
            await _build_client_only_venv(top)
            open(done, "w").close()
    finally:
        os.close(lock)
    _venv = os.path.join(top, "venv")
    return _venv


async def _build_client_only_venv(top: str) -> str:
    """Copy the sources, build the wheel, make a virtualenv in ``top`` and install the wheel without extras."""
    src, dist, venv = (os.path.join(top, name) for name in ("src", "dist", "venv"))
    os.makedirs(src)
    for name in SOURCES:
        path = os.path.join(CHECKOUT, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(src, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache"))
        else:
            shutil.copy(path, src)
    env = _clean_env()
    steps = [
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", dist, src],
        # No pip inside: the outer pip installs into it (--python), which saves seconds.
        [sys.executable, "-m", "venv", "--without-pip", venv],
    ]
    for argv in steps:
        result = await run(argv, top, env, timeout=BUILD_TIMEOUT)
        assert result.code == 0, "{} failed: {!r}".format(" ".join(argv), result)
    [wheel] = [os.path.join(dist, name) for name in os.listdir(dist) if name.endswith(".whl")]
    install = [sys.executable, "-m", "pip", "--python", os.path.join(venv, "bin", "python"), "install", "--quiet",
               wheel]
    result = await run(install, top, env, timeout=BUILD_TIMEOUT)
    assert result.code == 0, "installing the wheel without extras failed: {!r}".format(result)
    return venv


class ClientOnlyInstall(TestCase):
    """The wheel without the server extra, in a fresh virtualenv."""

    timeout = BUILD_TIMEOUT + 4 * RUN_TIMEOUT

    async def venv_run(self, command: str, *args: str, stdin: bytes = b"") -> Run:
        """Run ``command`` from the client-only virtualenv's bin/, in a directory outside the checkout."""
        venv = await client_only_venv()
        home = getattr(self, "_home", None)
        if home is None:
            home = self._home = os.path.abspath(self.mktemp())
            os.makedirs(home)
        return await run([os.path.join(venv, "bin", command), *args], home, _clean_env({"XDG_CONFIG_HOME": home}),
                         stdin=stdin)

    async def test_no_server_packages_and_every_sdk_module_imports(self) -> None:
        """Installed without [server], none of the server-only distributions (Klein, psycopg2, txredisapi, hiredis, prometheus-client) is there, and every SDK and CLI module imports from the virtualenv."""
        dists = server_extra()
        self.assertTrue({"klein", "psycopg2-binary", "txredisapi", "hiredis", "prometheus-client"} <= set(dists), dists)
        modules = list(SERVER_MODULES) + ["hiredis"]
        result = await self.venv_run("python", "-c", _INSPECT, orjson.dumps([dists, modules]).decode())
        self.assertEqual(result.code, 0, result)
        report = orjson.loads(result.out)
        self.assertTrue(report["package"].startswith(report["prefix"] + os.sep), report["package"])
        self.assertEqual(report["failed"], {})
        self.assertIn("pocketbridge.client.rest", report["imported"])
        self.assertEqual(report["present_dists"], [])
        self.assertEqual(report["present_modules"], [])

    async def test_cli_keygen_send_watch_status_against_a_real_server(self) -> None:
        """pocketbridge-cli from the client-only install makes keys, sends an encrypted event that a second device watches and decrypts, and reports status of a real server."""
        a = await self.venv_run("pocketbridge-cli", "keygen", "--keys", "a.json", "--name", "Laptop")
        self.assertEqual(a.code, 0, a)
        self.assertRegex(a.out, r"(?m)^user_id=[0-9a-f]{64}$")
        b = await self.venv_run("pocketbridge-cli", "keygen", "--keys", "b.json", "--from", "a.json", "--name", "Phone")
        self.assertEqual(b.code, 0, b)
        server = await start_server(self)
        sent = await self.venv_run("pocketbridge-cli", "send", "--url", server.http_url, "--keys", "a.json",
                                   "--stream", STREAM, "--type", TYPE, stdin=b"from the light client")
        self.assertEqual((sent.code, sent.out.strip()), (0, "stored seq=1 stream_seq=1"), sent)
        watched = await self.venv_run("pocketbridge-cli", "watch", "--url", server.http_url, "--keys", "b.json",
                                      "--count", "1")
        self.assertEqual((watched.code, watched.out),
                         (0, "seq=1 stream={} type={}\nfrom the light client\n".format(STREAM, TYPE)), watched)
        status = await self.venv_run("pocketbridge-cli", "status", "--url", server.ws_url, "--keys", "a.json")
        self.assertEqual(status.code, 0, status)
        lines = dict(line.split(":", 1) for line in status.out.splitlines())
        self.assertTrue(lines["health"].strip().startswith("ok ("), status.out)
        self.assertIn("of 2 devices", lines["presence"])

    async def test_twistd_pocketbridge_says_what_to_install_in_one_line(self) -> None:
        """twistd pocketbridge (and pocketbridge-admin migrate, pocketbridge-bench) without the server extra print one line naming `pip install 'pocketbridge[server]'` and exit non-zero, with no traceback."""
        for command in (["twistd", "-n", "pocketbridge"], ["twistd", "pocketbridge", "--help"],
                        ["pocketbridge-admin", "migrate", "--data-dir", "data"],
                        ["pocketbridge-bench", "--help"]):
            result = await self.venv_run(*command)
            self.assertNotEqual(result.code, 0, (command, result))
            self.assertIsNotNone(result.code, (command, result))
            output = (result.out + result.err).strip().splitlines()
            self.assertEqual(len(output), 1, (command, result))
            self.assertIn(SERVER_INSTALL_HINT, output[0])
            self.assertNotIn("Traceback", result.err)
        self.assertFalse(os.path.exists(os.path.join(self._home, "data")))


class MissingServerDependencies(SynchronousTestCase):
    """``pocketbridge.server.tap.Options`` when a server module cannot be found, in this process."""

    def test_options_exit_with_one_line_naming_the_extra(self) -> None:
        """With a server module missing, parsing the options (even --help) writes one line naming the missing module and the install command, and exits 2."""
        stderr = io.StringIO()
        self.patch(tap, "SERVER_MODULES", tap.SERVER_MODULES + ("pocketbridge_no_such_module",))
        self.patch(sys, "stderr", stderr)
        for argv in ([], ["--help"]):
            with self.assertRaises(SystemExit) as raised:
                tap.Options().parseOptions(argv)
            self.assertEqual(raised.exception.code, 2)
        self.assertEqual(stderr.getvalue().splitlines(), [
            "pocketbridge: the server's dependencies are not installed (no pocketbridge_no_such_module); "
            "install them with: pip install 'pocketbridge[server]'"] * 2)

    def test_nothing_missing_here(self) -> None:
        """The test environment has the server extra, so no server module is reported missing."""
        self.assertEqual(tap.missing_server_modules(), [])
