# replicad as a container image, made to run as a sidecar beside an application that writes a
# SQLite database in WAL mode. How to build it and run it, and the rules for sharing the
# database volume: docs/container.md.
#
#   docker build -t replicad:0.1.0 .
#   deploy/build-image.sh replicad:0.1.0      # the same Dockerfile, built with buildah
#
# BASE must provide python3 (3.11 or newer) with the venv module. The default is the official
# Python image, pinned. deploy/build-image.sh passes a Debian bookworm rootfs that has python3
# and python3-venv. Both stages use the same BASE, so the venv's bin/python symlink still points
# at an interpreter that exists in the final stage.
ARG BASE=python:3.11.10-slim-bookworm

# ---- build: a wheel of replicad, then a venv holding it and its dependencies -----------------
FROM ${BASE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_PROGRESS_BAR=off \
    PYTHONDONTWRITEBYTECODE=1

# pip, setuptools and wheel get their own venv, so none of them end up in the final image.
RUN python3 -m venv /opt/build

# Only what the wheel is built from. .dockerignore keeps everything else out of the context.
COPY pyproject.toml README.md /src/
COPY replicad /src/replicad

# Optional build secret "pip_ca": a CA bundle, for builds whose route to the package index goes
# through a TLS-inspecting proxy. It is mounted for this step only and is never stored in a
# layer. deploy/build-image.sh passes the host's bundle when pip on the host uses one.
# --only-binary: every dependency must come as a wheel. The image has no compiler, and this step
# should fail here rather than try to compile one.
# --python: the runtime venv is created without pip, and the build venv's pip installs into it.
# The dependencies' own test suites are removed: about 17 MB that nothing imports.
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels /src \
    && python3 -m venv --without-pip /opt/replicad \
    && /opt/build/bin/pip --python /opt/replicad/bin/python install --only-binary=:all: \
        /wheels/replicad-*.whl \
    && find /opt/replicad/lib -depth -type d -name tests -exec rm -rf {} + \
    && /opt/replicad/bin/replicad --version

# ---- final: the interpreter from BASE plus /opt/replicad, no build tools ---------------------
FROM ${BASE}

# A dedicated numeric uid/gid. USER must be numeric so Kubernetes' runAsNonRoot can verify it.
# The application container must be able to write the database directory too: give it the same
# uid, or this gid and a umask of 0002 (docs/container.md).
ARG UID=10001
ARG GID=10001

# /data is the conventional mount point for the shared database volume. It is created here,
# owned by replicad, so that a new named Docker volume mounted on it starts with that owner.
# There is no VOLUME instruction on purpose: an anonymous volume that the application does not
# share would leave replicad waiting for a database that never appears.
RUN groupadd --system --gid "${GID}" replicad \
    && useradd --uid "${UID}" --gid "${GID}" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin replicad \
    && install -d -o "${UID}" -g "${GID}" -m 0775 /data

COPY --from=build /opt/replicad /opt/replicad

# REPLICAD_HEALTHCHECK_URL is read by HEALTHCHECK only, never by replicad. The configuration
# must enable the endpoint, for example with metrics_addr = "0.0.0.0:9090".
ENV PATH=/opt/replicad/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REPLICAD_HEALTHCHECK_URL=http://127.0.0.1:9090/readyz

LABEL org.opencontainers.image.title="replicad" \
      org.opencontainers.image.description="Continuous backup of SQLite (WAL mode) to S3-compatible storage or a directory" \
      org.opencontainers.image.licenses="Apache-2.0"

USER ${UID}:${GID}
WORKDIR /data
EXPOSE 9090

# replicad handles SIGTERM itself: it ships everything committed, then exits 0. It does this
# within shutdown_timeout, 30 s by default. The engine must wait longer than that before it
# sends SIGKILL: docker stop -t, compose stop_grace_period, or terminationGracePeriodSeconds.
# replicad runs as PID 1. It installs its own signal handlers and starts no child processes
# (except the application, under `replicad exec`, which it waits for), so no init is needed.
STOPSIGNAL SIGTERM

# /readyz returns 503 while a commit has waited longer than ready_max_lag (10 s) to reach a
# replica, and until the database exists and replication has started. The start period covers
# the first snapshot of a large database. It uses Python's urllib, so the image needs no curl.
# A failed probe exits non-zero: urlopen raises on a refused connection or an HTTP 503.
HEALTHCHECK --interval=30s --timeout=5s --start-period=2m --retries=3 \
    CMD ["/opt/replicad/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['REPLICAD_HEALTHCHECK_URL'], timeout=4)"]

ENTRYPOINT ["replicad"]
CMD ["replicate", "-c", "/etc/replicad.toml"]
