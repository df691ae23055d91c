"""Configuration: every mistake names the file and the key; secrets never show."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicad.config import Secret, config_from_args, load_config, replica_from_url
from replicad.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ENV = {"R2_ACCESS_KEY_ID": "AKIDEXAMPLE", "R2_SECRET_ACCESS_KEY": "sekrit-value-123"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "replicad.toml"
    path.write_text(text)
    return path


def test_example_config_is_valid_and_masks_secrets() -> None:
    config = load_config(ROOT / "config.example.toml", env=ENV)
    db = config.databases[0]
    assert db.name == "app"
    local, r2 = db.replicas
    assert local.path == Path("/var/backups/app")
    assert r2.s3 is not None
    assert r2.s3.region == "auto"
    assert r2.s3.secret_access_key == Secret("sekrit-value-123")
    assert "sekrit" not in repr(config)
    assert "sekrit" not in r2.url


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('log_levl = "info"\n', "log_levl: unknown key (hint: did you mean 'log_level'?"),
        ("[[databases]]\npath = 'a.db'\n", "databases[0].replicas: missing (required)"),
        (
            "[[databases]]\npath='a.db'\n[[databases.replicas]]\nurl='file:///x'\nnme='y'\n",
            "databases[0].replicas[0].nme: unknown key",
        ),
        (
            "[[databases]]\npath='a.db'\n[[databases.replicas]]\nurl='ftp://x'\n",
            "databases[0].replicas[0].url: unsupported replica URL",
        ),
        (
            "[[databases]]\npath='a.db'\npoll_interval=-1\n[[databases.replicas]]\nurl='file:///x'\n",
            "databases[0].poll_interval: must not be negative",
        ),
        (
            "[[databases]]\npath='a.db'\n[[databases.replicas]]\nurl='s3://b/p'\n"
            "secret_access_key='${NOPE_UNSET}'\naccess_key_id='x'\n",
            "environment variable NOPE_UNSET is not set",
        ),
        (
            "[[databases]]\npath='a.db'\n[[databases.replicas]]\nurl='s3://b/p?endpoint=x'\n"
            "endpoint='y'\n",
            "set both in the URL and as a key",
        ),
        ("shutdown_timeout = 'soon'\n[[databases]]\n", "shutdown_timeout: expected a number"),
        ("this is not toml", "invalid TOML"),
        (
            "ready_max_verify_age = 600\n[[databases]]\npath='a.db'\n"
            "[[databases.replicas]]\nurl='file:///x'\n",
            "databases[0].verify_interval: ready_max_verify_age = 600 needs drills",
        ),
        (
            "[[databases]]\npath='a.db'\nverify_interval=-5\n[[databases.replicas]]\n"
            "url='file:///x'\n",
            "databases[0].verify_interval: must not be negative",
        ),
        (
            "[[databases]]\npath='a.db'\n[[databases.replicas]]\nurl='file:///x'\n"
            "[[databases.replicas]]\nurl='file:///y'\nname='file0'\n",
            "duplicate name 'file0'",
        ),
    ],
)
def test_mistakes_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_secret_in_env_never_reaches_error_messages(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[[databases]]\npath='a.db'\n[[databases.replicas]]\nurl='s3://b/p'\n"
        "secret_access_key='${S}'\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"S": "top-secret-xyz"})
    assert "access_key_id and secret_access_key must be set together" in str(info.value)
    assert "top-secret-xyz" not in str(info.value)


def test_dollar_escape_and_expansion(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[[databases]]\npath='${DIR}/a.db'\nname='$${literal}'\n"
        "[[databases.replicas]]\nurl='file:///x'\n",
    )
    db = load_config(path, env={"DIR": "/data"}).databases[0]
    assert db.path == Path("/data/a.db")
    assert db.name == "${literal}"


def test_missing_file_suggests_quick_form(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(tmp_path / "nope.toml")
    assert "replicad replicate DB_PATH REPLICA_URL" in (info.value.hint or "")


def test_quick_form_and_url_parameters() -> None:
    config = config_from_args(
        "app.db", "s3://bkt/some/prefix?endpoint=http://127.0.0.1:9000&path_style=true", env={}
    )
    replica = config.databases[0].replicas[0]
    assert replica.s3 is not None
    assert (replica.s3.bucket, replica.s3.prefix) == ("bkt", "some/prefix")
    assert replica.s3.endpoint == "http://127.0.0.1:9000"
    assert replica.s3.path_style is True
    assert config.databases[0].path == Path("app.db").absolute()
    assert replica_from_url("file:///srv/backup", env={}).path == Path("/srv/backup")
    with pytest.raises(ConfigError, match="absolute local path"):
        replica_from_url("file://relative/dir", env={})
    with pytest.raises(ConfigError, match="unknown URL parameter 'secret'"):
        replica_from_url("s3://b/p?secret=x", env={})
