# PocketBridge server image.
#
#   docker build -t pocketbridge .
#   docker run -p 3001:3001 -v pocketbridge-data:/data pocketbridge
#
# With no configuration the container runs the embedded shape: SQLite and the
# generated server key in /data. For a cluster (PostgreSQL + Redis + several
# nodes behind a proxy) see deploy/docker-compose.yml and docs/operations.md.

# ---------------------------------------------------------------- builder
# Builds the project's wheel and collects wheels of all its dependencies, so
# the runtime stage installs from local files only and needs no compiler.
# The runtime stage bind-mounts these wheels (RUN --mount), which needs
# BuildKit, the default builder since Docker Engine 23.
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml setup.cfg setup.py README.md ./
COPY pocketbridge ./pocketbridge
COPY schema ./schema
COPY twisted ./twisted

# A regular (non-editable) wheel: it carries twisted/plugins/pocketbridge_plugin.py
# into site-packages, where twistd finds the plugin. [server]: the server's own
# dependencies (without the extra only the client SDK's are collected).
RUN pip wheel --wheel-dir /wheels '.[server]'

# ---------------------------------------------------------------- runtime
FROM python:3.11-slim

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PB_DATA_DIR=/data

# Only the wheels built above are installed (--no-index), so versions are those
# the builder resolved.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels 'pocketbridge[server]' \
    # Build Twisted's plugin cache now, as root: the server user cannot write
    # to site-packages, and twistd would otherwise warn on every start.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && twistd pocketbridge --help > /dev/null

RUN groupadd --system --gid 10001 pocketbridge \
    && useradd --system --uid 10001 --gid pocketbridge --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin pocketbridge \
    && mkdir -p /data \
    && chown pocketbridge:pocketbridge /data \
    && chmod 0700 /data

# The SQLite file (embedded shape) and the generated server identity key live
# here. A cluster keeps its data in PostgreSQL and its key in the environment.
VOLUME ["/data"]
WORKDIR /data
# Numeric, so that runtimes can check it is not root without reading /etc/passwd.
USER 10001:10001

# WebSocket (/ws), REST API and /health. /metrics is on this port too unless
# --metrics-listen moves it (the compose example uses tcp:9100).
EXPOSE 3001

# /health answers 200 when storage and the bus are reachable, 503 when one is
# not or the node is draining (urlopen raises on 503, which exits 1). slim has
# no curl, so Python's urllib does the request. This probes plain HTTP on port
# 3001; adjust it if you change --listen (e.g. to an ssl: endpoint).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3001/health', timeout=4).status == 200 else 1)"]

# SIGTERM (docker stop) stops accepting, closes sockets with 1001 and commits
# what the writer holds. Give it time: docker stop -t / stop_grace_period.
STOPSIGNAL SIGTERM

# -n: stay in the foreground and log to stdout; --pidfile=: no pid file.
CMD ["twistd", "-n", "--pidfile=", "pocketbridge", "--listen", "tcp:3001"]
