"""
``pocketbridge-bench``: the PocketBridge benchmark (docs/benchmarks.md).

It drives an already running server with the project's client SDK and
measures raw baselines on the same machine in the same run:

- ``cli``: options, the order of the run, output (table or JSON);
- ``runner``: every measurement in its own child process with its own reactor;
- ``load``: SDK clients as load generators (stamped payloads, closed and open loops);
- ``scenario_connections``: handshakes/s, memory per idle connection;
- ``scenario_cycle``: connect → handshake → close cycles/s and server CPU per cycle;
- ``throttle``: a refusal by a server limit stops the run and names the setting to raise;
- ``compare``: ``--compare-workers``, the server started once per worker count;
- ``probe``: machine facts, a server's ``/health`` and ``/metrics``;
- ``scenario_events``: events end to end, latency at a fixed rate, fan-out,
  catch-up, two nodes;
- ``baseline_ws`` (with the ``echo`` server), ``baseline_store``
  (PostgreSQL, SQLite, Redis): the raw baselines;
- ``prefill``: bulk-loads N events into the server's database (``--prefill``),
  so the scenarios can be measured again on a table that is not nearly empty;
- ``stats``: percentiles and CPU/RSS readings from ``/proc``;
- ``report``: headline keys, ratios, targets, the table.
"""


def main() -> None:
    """The ``pocketbridge-bench`` entry point: refuse in one line without the server extra, then run."""
    import sys

    from pocketbridge.server.tap import SERVER_INSTALL_HINT, missing_server_modules

    missing = missing_server_modules()
    if missing:
        sys.stderr.write("pocketbridge-bench: the server's dependencies are not installed (no {}); install them "
                         "with: {}\n".format(", ".join(missing), SERVER_INSTALL_HINT))
        raise SystemExit(2)
    from pocketbridge.bench.cli import main as run

    raise SystemExit(run())
