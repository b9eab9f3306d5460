# raftkv node image.
#
#   python3 -m pip wheel -w wheelhouse .        # the project and every dependency, as wheels
#   docker build -t raftkv:local .
#
# The build installs from wheels only (`pip install --no-index --find-links /wheels`), so it
# needs no network. If wheelhouse/ holds no raftkv wheel, the build stage makes the wheels
# itself with `pip wheel` (that one step needs PyPI).
#
# BASE must be a Debian-like image with python3 >= 3.11 and the venv module: python:3.11-slim
# by default; any other (e.g. a debootstrapped bookworm: --build-arg BASE=raftkv-base:local)
# works as long as the wheels match its python (cp311 here) and glibc.
ARG BASE=python:3.11-slim

# -- build: a venv in /opt/raftkv with raftkv and its dependencies ----------------------------
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
COPY . /src
RUN set -eu; \
    mkdir -p /wheels; \
    if ls /src/wheelhouse/raftkv-*.whl >/dev/null 2>&1; then \
        cp /src/wheelhouse/*.whl /wheels/; \
    else \
        python3 -m pip wheel -w /wheels /src; \
    fi; \
    python3 -m venv /opt/raftkv; \
    /opt/raftkv/bin/pip install --no-index --find-links /wheels raftkv; \
    /opt/raftkv/bin/raftkv --help >/dev/null

# -- runtime ----------------------------------------------------------------------------------
FROM ${BASE}
LABEL org.opencontainers.image.title="raftkv" \
      org.opencontainers.image.description="A sharded, Raft-replicated key-value server with a gRPC API"
COPY --from=build /opt/raftkv /opt/raftkv
# The venv's bin comes first: `raftkv` and `python` (for healthchecks) work on any base, also on
# one that only has `python3`.
ENV PATH=/opt/raftkv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# uid/gid 10001: fixed, so that Kubernetes' fsGroup (deploy/k8s) can name it.
# /certs and /ca are empty mount points owned by raftkv, so that named volumes mounted there
# start out writable by it (compose.yaml: credentials in /certs, the CA key alone in /ca).
RUN set -eu; \
    groupadd --system --gid 10001 raftkv; \
    useradd --system --uid 10001 --gid raftkv --home-dir /data --no-create-home --shell /usr/sbin/nologin raftkv; \
    install -d -o raftkv -g raftkv -m 0750 /data; \
    install -d -o raftkv -g raftkv -m 0700 /certs /ca; \
    install -d -m 0755 /etc/raftkv
USER raftkv
WORKDIR /data
VOLUME ["/data"]
# 7001: client gRPC; 7101: Raft (keep it on a private network); 9101: metrics, if enabled.
EXPOSE 7001 7101 9101
ENTRYPOINT ["raftkv"]
CMD ["serve", "--cluster", "/etc/raftkv/cluster.toml", "--id", "n1", "--data-dir", "/data", "--log-dir", "/data/logs"]
