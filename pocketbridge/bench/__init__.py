"""
``pocketbridge-bench``: the PocketBridge benchmark (docs/benchmarks.md).

It drives an already running server with the project's client SDK and
measures raw baselines on the same machine in the same run:

- ``cli``: options, the order of the run, output (table or JSON);
- ``runner``: every measurement in its own child process with its own reactor;
- ``load``: SDK clients as load generators (stamped payloads, closed and open loops);
- ``scenario_connections``: handshakes/s, memory per idle connection;
- ``scenario_events``: events end to end, latency at a fixed rate, fan-out,
  catch-up, two nodes;
- ``baseline_ws`` (with the ``echo`` server), ``baseline_store``
  (PostgreSQL, SQLite, Redis): the raw baselines;
- ``prefill``: bulk-loads N events into the server's database (``--prefill``),
  so the scenarios can be measured again on a table that is not nearly empty;
- ``stats``: percentiles and CPU/RSS readings from ``/proc``;
- ``report``: headline keys, ratios, targets, the table.
"""
