"""Secrets never echoed: not by `config check`, not in configuration errors, not to the child
process of `replicad exec`.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

from replicad.cli import scrub_credentials
from replicad.config import load_config, redact_url
from replicad.errors import ConfigError
from tests import workload
from tests.procs import replicad
from tests.s3servers import S3Server, create_bucket, unique_bucket

PASSWORD = "hunter2-never-shown"


def _config(tmp_path: Path, replica: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f"[[databases]]\npath = '{tmp_path / 'a.db'}'\n[[databases.replicas]]\n{replica}"
    )
    return path


def test_config_check_refuses_endpoint_userinfo_without_showing_it(tmp_path: Path) -> None:
    config = _config(
        tmp_path, f"url = 's3://bucket/p'\nendpoint = 'https://admin:{PASSWORD}@minio:9000'\n"
    )
    result = replicad("config", "check", "-c", str(config))
    assert result.returncode == 2
    assert "replicas[0].endpoint: must not contain a user name or password" in result.stderr
    assert "https://admin:***@minio:9000" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_s3_url_with_userinfo_is_refused_without_showing_it(tmp_path: Path) -> None:
    config = _config(tmp_path, f"url = 's3://KEY:{PASSWORD}@bucket/p'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "replicas[0].url: must not contain a user name or password" in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize("key", ["access_key_id", "secret_access_key", "session_token"])
@pytest.mark.parametrize("value", ["8675309123456789", "true", "[1, 2]", "1.5e9"])
def test_secret_of_the_wrong_type_is_not_echoed(tmp_path: Path, key: str, value: str) -> None:
    config = _config(tmp_path, f"url = 's3://bucket/p'\n{key} = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert f"replicas[0].{key}: expected a string, got " in message
    assert "not shown: it is a secret" in message
    for fragment in ("8675309", "1.5", "[1, 2]", "True"):
        assert fragment not in message


@pytest.mark.parametrize(
    "url",
    [f"ftp://user:{PASSWORD}@host/dir", f"https://u:{PASSWORD}@h/x", f"file://me:{PASSWORD}@h/x"],
)
def test_rejected_urls_hide_their_password(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_config(tmp_path, f"url = '{url}'\n"))
    assert PASSWORD not in str(caught.value)
    assert ":***@h" in str(caught.value)


def test_redact_url() -> None:
    assert redact_url("ftp://u:p@h:21/x?y=1") == "ftp://u:***@h:21/x?y=1"
    assert redact_url("ftp://u@h/x") == "ftp://u@h/x"
    assert redact_url("s3://bucket/p") == "s3://bucket/p"


def test_scrub_credentials_by_name_and_by_value() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "AKID",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_SESSION_TOKEN": "t",
        "R2_SECRET": "from-config",
        "AWS_REGION": "auto",
        "PATH": "/bin",
    }
    kept, removed = scrub_credentials(env, {"from-config"})
    assert kept == {"AWS_REGION": "auto", "PATH": "/bin"}
    assert removed == [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "R2_SECRET",
    ]


_PRINT_ENV = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))"


async def _exec_child_env(server: S3Server, tmp_path: Path, *flags: str) -> dict[str, str]:
    bucket = unique_bucket()
    await create_bucket(server, bucket)
    db = tmp_path / "a.db"
    conn = sqlite3.connect(db)
    workload.setup(conn)
    conn.close()
    config = tmp_path / "c.toml"
    config.write_text(
        f"[[databases]]\npath = '{db}'\n[[databases.replicas]]\n"
        f"url = 's3://{bucket}/p?endpoint={server.endpoint_url}&path_style=true&region=us-east-1'\n"
        "access_key_id = '${APP_REPLICA_KEY}'\nsecret_access_key = '${APP_REPLICA_SECRET}'\n"
    )
    out = tmp_path / "child-env.json"
    env = {
        "APP_REPLICA_KEY": server.access_key_id,
        "APP_REPLICA_SECRET": server.secret_access_key,
        "AWS_SESSION_TOKEN": "token-for-replicad",
        "AWS_EC2_METADATA_DISABLED": "true",
        "APP_SETTING": "kept",
    }
    cmd = ["exec", "-c", str(config), *flags, "--", sys.executable, "-c", _PRINT_ENV, str(out)]
    result = replicad(*cmd, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    child: dict[str, str] = json.loads(out.read_text())
    return child


async def test_exec_scrubs_replicads_credentials_from_the_child(
    moto_server: S3Server, tmp_path: Path
) -> None:
    child = await _exec_child_env(moto_server, tmp_path)
    assert child["APP_SETTING"] == "kept"
    for name in ("APP_REPLICA_KEY", "APP_REPLICA_SECRET", "AWS_SESSION_TOKEN"):
        assert name not in child
    assert moto_server.secret_access_key not in json.dumps(child)


async def test_exec_passes_credentials_when_asked(moto_server: S3Server, tmp_path: Path) -> None:
    child = await _exec_child_env(moto_server, tmp_path, "--pass-credentials")
    assert child["APP_REPLICA_SECRET"] == moto_server.secret_access_key
    assert child["AWS_SESSION_TOKEN"] == "token-for-replicad"
