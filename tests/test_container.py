"""The container packaging: Dockerfile, deploy/docker-compose.yml, deploy/kubernetes.yaml, and a
real image build with deploy/build-image.sh.

The manifest tests are fast and run by default. They check the settings whose mistakes only
show in production: grace periods shorter than shutdown_timeout, two writers, a readiness wait
that deadlocks, and embedded replicad.toml files that replicad itself would reject.

The image test is marked slow (run with `pytest -m slow tests/test_container.py`). It runs
deploy/build-image.sh, which may apt-get install buildah and debootstrap, debootstraps a Debian
rootfs, builds the Dockerfile with pip reaching the package index, and smoke-tests the image. It
skips only when the script says this machine cannot run buildah at all (exit 77), and the
evidence goes into the skip reason.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from replicad import __version__
from replicad.config import Config, load_config
from tests.procs import ROOT

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes.yaml"
BUILD_SCRIPT = ROOT / "deploy" / "build-image.sh"
#: build-image.sh's exit status for "this machine cannot run buildah" (automake's skip code).
EXIT_CANNOT_RUN = 77


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _replicad_config(text: str, tmp_path: Path, name: str) -> Config:
    """An embedded replicad.toml, validated by replicad's own loader."""
    path = tmp_path / name
    path.write_text(text)
    return load_config(path, env={})


def _seconds(value: str | int) -> float:
    """A Compose duration such as "45s", "1m30s" or "2m"."""
    if isinstance(value, int):
        return float(value)
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", value)
    assert value, "empty duration"
    assert parts, f"unexpected duration {value!r}"
    return 60.0 * int(parts[1] or 0) + int(parts[2] or 0)


# -- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_is_pinned_non_root_and_stops_gracefully() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG BASE=python:3.11.10-slim-bookworm" in text
    assert text.count("FROM ${BASE}") == 2  # build stage and final stage
    assert re.search(r"^USER \$\{UID\}:\$\{GID\}$", text, re.MULTILINE)
    assert re.search(r"^ARG UID=10001$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["replicad"]' in text
    assert 'CMD ["replicate", "-c", "/etc/replicad.toml"]' in text
    assert "STOPSIGNAL SIGTERM" in text
    healthcheck = text[text.index("HEALTHCHECK") :]
    assert "urllib.request" in healthcheck
    assert "REPLICAD_HEALTHCHECK_URL=http://127.0.0.1:9090/readyz" in text
    assert not re.search(r"^VOLUME", text, re.MULTILINE)  # see the comment in the Dockerfile


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!replicad/"} <= set(lines)
    assert {".git", ".venv", "tests", "**/__pycache__", "**/*.env"} <= set(lines)


# -- docker compose --------------------------------------------------------------------------


def test_compose_shares_one_local_volume_and_outlasts_shutdown_timeout(tmp_path: Path) -> None:
    (compose,) = _yaml_documents(COMPOSE)
    services = compose["services"]
    config = _replicad_config(compose["configs"]["replicad"]["content"], tmp_path, "c.toml")
    assert config.metrics_addr == "0.0.0.0:9090"
    assert [str(db.path) for db in config.databases] == ["/data/app.db"]

    # Every service mounts the same named volume at /data, and it is a local one.
    for name in ("restore", "replicad", "app"):
        assert "data:/data" in services[name]["volumes"], name
    assert compose["volumes"]["data"]["driver"] == "local"

    replicad = services["replicad"]
    assert _seconds(replicad["stop_grace_period"]) > config.shutdown_timeout
    assert replicad["command"] == ["replicate", "-c", "/etc/replicad.toml"]
    assert "readyz" in " ".join(replicad["healthcheck"]["test"])
    assert replicad["env_file"] == "replicad.env"
    assert replicad["depends_on"]["restore"]["condition"] == "service_completed_successfully"
    # The app creates the database, and /readyz is 503 until it exists: waiting for "healthy"
    # would deadlock.
    assert services["app"]["depends_on"]["replicad"]["condition"] == "service_started"
    assert services["app"]["user"] == "10001:10001"

    restore = services["restore"]["command"]
    assert {"--if-db-not-exists", "--if-replica-exists"} <= set(restore)
    assert restore[restore.index("-o") + 1] == "/data/app.db"


# -- Kubernetes ------------------------------------------------------------------------------


def _kube(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _yaml_documents(KUBERNETES) if d["kind"] == kind]
    return doc


def test_kubernetes_runs_one_writer_with_restore_and_sidecar(tmp_path: Path) -> None:
    config_map = _kube("ConfigMap")
    config = _replicad_config(config_map["data"]["replicad.toml"], tmp_path, "k.toml")
    assert config.metrics_addr == "0.0.0.0:9090"
    assert [str(db.path) for db in config.databases] == ["/data/app.db"]
    assert _kube("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert set(_kube("Secret")["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

    deployment = _kube("Deployment")["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"] == {"type": "Recreate"}
    pod = deployment["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.shutdown_timeout
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["fsGroup"] == 10001

    restore, sidecar = pod["initContainers"]
    assert restore["args"][:3] == ["restore", "-c", "/etc/replicad.toml"]
    assert {"--if-db-not-exists", "--if-replica-exists"} <= set(restore["args"])
    assert "restartPolicy" not in restore  # a regular init container: runs to completion first

    assert sidecar["restartPolicy"] == "Always"  # native sidecar: stops after the app
    assert sidecar["args"] == ["replicate", "-c", "/etc/replicad.toml"]
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # /readyz would deadlock a first deployment (no database until the app starts).
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz"
    liveness = sidecar["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > config.shutdown_timeout

    (app,) = pod["containers"]
    for container in (restore, sidecar, app):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["data"] == "/data", container["name"]
    for container in (restore, sidecar):
        assert container["envFrom"] == [{"secretRef": {"name": "replicad-credentials"}}]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "app-data"


def test_compose_config_has_nothing_for_compose_to_interpolate() -> None:
    """Compose expands ${...} in the whole file, inline configs included, before replicad sees
    them. Credentials come from replicad.env as AWS_* variables, so the config needs no $.
    """
    (compose,) = _yaml_documents(COMPOSE)
    text = compose["configs"]["replicad"]["content"]
    assert "$" not in text
    assert tomllib.loads(text)["shutdown_timeout"] == 30


# -- the image -------------------------------------------------------------------------------


def test_build_script_parses() -> None:
    assert os.access(BUILD_SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], check=True)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_image_builds_and_runs_with_buildah(tmp_path: Path) -> None:
    """Build the Dockerfile with buildah on a debootstrapped Debian base, then run it. The
    smoke test in the image also replicates to a moto S3 server on this host's loopback.
    """
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    from tests.s3servers import create_bucket, start_moto, unique_bucket

    moto = start_moto(tmp_path / "moto")
    try:
        bucket = unique_bucket()
        asyncio.run(create_bucket(moto, bucket))
        query = f"endpoint={moto.endpoint_url}&path_style=true&region={moto.region}"
        # The whole environment: the script may need the host's CA bundle and proxy settings.
        env = dict(
            os.environ,
            REPLICAD_SMOKE_S3_URL=f"s3://{bucket}/smoke?{query}",
            AWS_ACCESS_KEY_ID=moto.access_key_id,
            AWS_SECRET_ACCESS_KEY=moto.secret_access_key,
        )
        result = subprocess.run(
            [str(BUILD_SCRIPT), "replicad:pytest"],
            capture_output=True,
            text=True,
            timeout=1700,
            check=False,
            cwd=ROOT,
            env=env,
        )
    finally:
        moto.stop()
    output = result.stdout + result.stderr
    if result.returncode == EXIT_CANNOT_RUN:
        reason = [line for line in output.splitlines() if "CANNOT RUN HERE" in line]
        pytest.skip(reason[-1] if reason else output[-1000:])
    assert result.returncode == 0, output[-6000:]
    assert f"replicad --version in the image: replicad {__version__}" in output
    assert "smoke: S3 replica with credentials from the environment" in output
    assert "smoke: ok" in output
    assert "build-image: OK: replicad:pytest" in output
