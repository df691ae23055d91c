"""Client-side encryption with age: replicate and restore every TXID encrypted, refuse missing
and wrong identities clearly, never mix plaintext and encrypted objects, and rotate keys in
place with the daemon running and after a crash in the middle of a rekey.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import cast

import pytest
from pyrage import x25519

from replicad.clients.base import ReplicaClient
from replicad.clients.crypt import (
    DECRYPT_THREAD,
    MAGIC,
    CryptClient,
    load_identities,
    parse_recipient,
    recipients_of_head,
)
from replicad.clients.file import FileReplicaClient
from replicad.errors import FormatError, ObjectLockedError, ReplicaUnavailableError
from replicad.position import parse_key
from replicad.restore import make_plan, restore
from tests import workload
from tests.procs import ROOT, clean_env, replicad, start_daemon, start_writer, stop, wait_for

SEED = 77


def _x25519_key(path: Path) -> str:
    """Write a new age identity file; its public recipient."""
    identity = x25519.Identity.generate()
    path.write_text(f"# test key\n{identity}\n")
    path.chmod(0o600)
    return str(identity.to_public())


def _ssh_key(path: Path) -> str:
    """A new unencrypted OpenSSH ed25519 key at `path`; its public key line."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


def _config(
    tmp: Path, db: Path, rep: Path, recipients: list[str], sync_interval: float = 0.05
) -> Path:
    config = tmp / f"replicad-{len(list(tmp.glob('replicad-*.toml')))}.toml"
    config.write_text(
        f"[[databases]]\npath = '{db}'\nsync_interval = {sync_interval}\n"
        f"[[databases.replicas]]\nurl = '{rep.as_uri()}'\n"
        f"age_recipients = {json.dumps(recipients)}\n"
    )
    return config


def _objects(rep: Path) -> list[Path]:
    return sorted(p for p in rep.rglob("*") if p.is_file() and parse_key(_key(rep, p)))


def _key(rep: Path, path: Path) -> str:
    return path.relative_to(rep).as_posix()


def _made_for(path: Path) -> list[str] | None:
    labels = recipients_of_head(path.read_bytes()[:65536], path.name)
    return None if labels is None else sorted(labels)


class Keys:
    """Two age keys and an SSH key, in files."""

    def __init__(self, tmp: Path) -> None:
        self.a_file, self.b_file, self.ssh_file = tmp / "a.key", tmp / "b.key", tmp / "id_ed25519"
        self.a = _x25519_key(self.a_file)
        self.b = _x25519_key(self.b_file)
        self.ssh = _ssh_key(self.ssh_file)
        self.ssh_label = parse_recipient(self.ssh).label


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Keys, Path]:
    """A replica encrypted for key A and an SSH key by a daemon; the database; the keys; the
    writer's log.
    """
    tmp = tmp_path_factory.mktemp("encrypted")
    keys = Keys(tmp)
    db, rep = tmp / "app.db", tmp / "replica"
    _replicate_history(_config(tmp, db, rep, [keys.a, keys.ssh]), db, rep, count=120, rate=100)
    return rep, db, keys, tmp / "w.log"


def _replicate_history(config: Path, db: Path, rep: Path, *, count: int, rate: float) -> None:
    """A new database, replicated by a daemon with `config` while the writer commits `count`
    transactions; the daemon stopped cleanly.
    """
    conn = sqlite3.connect(db)
    workload.setup(conn)
    conn.close()
    log = config.with_suffix(".log")
    daemon = start_daemon(["-c", str(config)], log)
    try:
        wait_for(lambda: any(rep.glob("snapshots/*.snap")), 20, "first snapshot")
        writer = start_writer(db, db.with_name("w.log"), seed=SEED, count=count, rate=rate)
        assert writer.wait(timeout=60) == 0
    finally:
        assert stop(daemon) == 0, log.read_text()[-3000:]


def test_objects_are_encrypted_and_name_their_recipients(
    encrypted: tuple[Path, Path, Keys, Path],
) -> None:
    rep, _, keys, _ = encrypted
    objects = _objects(rep)
    assert len(objects) > 5
    for path in objects:
        data = path.read_bytes()
        assert data.startswith(MAGIC), path
        assert _made_for(path) == sorted([keys.a, keys.ssh_label])
        assert b"SQLite format 3" not in data
    leases = list(rep.glob("lease/*"))
    assert all(not p.read_bytes().startswith(MAGIC) for p in leases), "leases stay readable"


async def test_restore_every_txid_encrypted(
    encrypted: tuple[Path, Path, Keys, Path], tmp_path: Path
) -> None:
    rep, db, keys, _ = encrypted
    client = CryptClient(FileReplicaClient(rep), identities=load_identities(keys.a_file))
    try:
        plan = await make_plan(client)
        first = min(n.first_txid for n in plan.objects)
        states: dict[int, str] = {}
        for txid in range(first, plan.target_txid + 1):
            out = tmp_path / f"t{txid}.db"
            result = await restore(client, out, target_txid=txid, integrity="quick")
            assert result.txid == txid
            states[txid] = workload.digest(out)
            k = workload.seq_of(out)
            states[txid] = f"{k}:{states[txid]}"
            out.unlink()
    finally:
        await client.close()
    ks = {int(v.split(":")[0]) for v in states.values()}
    expected = workload.replays(SEED, ks, tmp_path / "replay.db", view=workload.digest)
    for txid, value in states.items():
        seq, digest = value.split(":")
        assert expected[int(seq)] == digest, f"TXID {txid}"
    assert max(ks) == 120
    assert len(ks) == 121, "every transaction of the writer is a restorable TXID"
    assert workload.dump(db)  # the source is still readable


def test_restore_with_one_of_several_recipients(
    encrypted: tuple[Path, Path, Keys, Path], tmp_path: Path
) -> None:
    rep, db, keys, _ = encrypted
    _restores_equal(keys.ssh_file, rep, tmp_path / "ssh.db", db)


def test_restore_without_an_identity_names_object_and_recipients(
    encrypted: tuple[Path, Path, Keys, Path], tmp_path: Path
) -> None:
    rep, _, keys, _ = encrypted
    result = replicad("restore", "-o", str(tmp_path / "x.db"), rep.as_uri())
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "is encrypted for" in result.stderr
    assert keys.a in result.stderr
    assert keys.ssh_label in result.stderr
    assert "no identity was given" in result.stderr
    assert "--age-identity-file" in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_restore_with_a_wrong_identity_is_refused(
    encrypted: tuple[Path, Path, Keys, Path], tmp_path: Path
) -> None:
    rep, _, keys, _ = encrypted
    out = tmp_path / "x.db"
    result = _restore_with(keys.b_file, rep, out)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"the identities given ({keys.b})" in result.stderr
    assert keys.a in result.stderr
    assert not out.exists()


def test_log_reads_an_encrypted_replica(encrypted: tuple[Path, Path, Keys, Path]) -> None:
    rep, _, keys, _ = encrypted
    result = replicad("log", "--json", "--age-identity-file", str(keys.a_file), rep.as_uri())
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 120
    locked = replicad("log", rep.as_uri())
    assert locked.returncode == 1
    assert "is encrypted for" in locked.stderr


async def test_mixing_plain_and_encrypted_objects_is_refused(tmp_path: Path) -> None:
    recipient = parse_recipient(_x25519_key(tmp_path / "k"))
    identities = load_identities(tmp_path / "k")
    async with FileReplicaClient(tmp_path / "rep") as raw:
        plain_client = CryptClient(raw)
        await plain_client.put_object("segments/00/plain", b"plaintext object")
        sealed_client = CryptClient(raw, recipients=[recipient], identities=identities)
        await sealed_client.put_object("segments/00/sealed", b"secret object")
        with pytest.raises(FormatError, match="refusing to mix"):
            await sealed_client.get_object("segments/00/plain")
        with pytest.raises(FormatError, match="refusing to mix"):
            async for _ in sealed_client.iter_object("segments/00/plain"):
                pass
        with pytest.raises(ObjectLockedError, match=recipient.label):
            await plain_client.get_object("segments/00/sealed")
        assert await sealed_client.get_object("segments/00/sealed") == b"secret object"
        chunks = [c async for c in sealed_client.iter_object("segments/00/sealed", chunk_size=4)]
        assert b"".join(chunks) == b"secret object"
        assert max(map(len, chunks)) <= 4


async def test_streamed_decryption_checks_every_chunk(tmp_path: Path) -> None:
    """A 3 MB object streams through in pieces; one altered byte deep inside is reported as
    damage (not as a wrong key), and a reader that stops early leaves nothing running.
    """
    recipient = parse_recipient(_x25519_key(tmp_path / "k"))
    client = CryptClient(
        FileReplicaClient(tmp_path / "rep"),
        recipients=[recipient],
        identities=load_identities(tmp_path / "k"),
    )
    payload = bytes(range(256)) * 12_000
    await client.put_object("snapshots/big", payload)
    chunks = [c async for c in client.iter_object("snapshots/big", chunk_size=100_000)]
    assert b"".join(chunks) == payload
    assert max(map(len, chunks)) == 100_000
    pieces = cast(AsyncGenerator[bytes, None], client.iter_object("snapshots/big", chunk_size=1000))
    async with contextlib.aclosing(pieces) as it:
        async for _ in it:
            break  # abandoned after the first piece
    assert not [t for t in threading.enumerate() if t.name == DECRYPT_THREAD]
    stored = tmp_path / "rep" / "snapshots" / "big"
    damaged = bytearray(stored.read_bytes())
    damaged[2_000_000] ^= 1
    stored.write_bytes(bytes(damaged))
    with pytest.raises(FormatError, match="is damaged") as caught:
        async for _ in client.iter_object("snapshots/big"):
            pass
    assert not isinstance(caught.value, ObjectLockedError)
    await client.close()


async def test_encrypted_objects_through_every_backend(
    replica_client: ReplicaClient, tmp_path: Path
) -> None:
    """Whole objects and streamed files (multipart on S3), read back whole and in chunks."""
    recipient = parse_recipient(_x25519_key(tmp_path / "k"))
    client = CryptClient(
        replica_client,
        recipients=[recipient],
        identities=load_identities(tmp_path / "k"),
        spool_dir=tmp_path,
    )
    small = b"segment bytes" * 100
    await client.put_object("segments/00/small", small, create_only=True)
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 50_000)  # 12.8 MB: several parts
    await client.put_file("snapshots/big", big, create_only=True)
    assert await client.get_object("segments/00/small") == small
    chunks = [c async for c in client.iter_object("snapshots/big", chunk_size=1 << 20)]
    assert b"".join(chunks) == big.read_bytes()
    raw = await replica_client.get_object("snapshots/big")
    assert raw.startswith(MAGIC)
    assert bytes(range(256)) * 4 not in raw
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith("sealed-")]
    assert not leftovers, "encryption temporaries are removed"


class _LandsThenFails:
    """A client whose puts store the object, then report a timeout (the reply was lost)."""

    def __init__(self, inner: ReplicaClient) -> None:
        self.inner = inner
        self.fail = True

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def put_object(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        await self.inner.put_object(key, data, create_only=create_only)
        if self.fail:
            self.fail = False
            raise ReplicaUnavailableError("timed out")


async def test_a_retried_put_sends_the_same_ciphertext(tmp_path: Path) -> None:
    """Encryption is randomized: without remembering the failed put's bytes, the create-only
    retry of a put that did land would look like another writer.
    """
    recipient = parse_recipient(_x25519_key(tmp_path / "k"))
    async with FileReplicaClient(tmp_path / "rep") as raw:
        client = CryptClient(_LandsThenFails(raw), recipients=[recipient])  # type: ignore[arg-type]
        with pytest.raises(ReplicaUnavailableError):
            await client.put_object("segments/00/a", b"data", create_only=True)
        await client.put_object("segments/00/a", b"data", create_only=True)


def test_bad_recipients_and_identity_files_are_clear(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        "[[databases]]\npath = '/tmp/a.db'\n[[databases.replicas]]\nurl = 'file:///tmp/r'\n"
        "age_recipients = ['age1notakey']\n"
    )
    result = replicad("config", "check", "-c", str(config))
    assert result.returncode == 2
    assert "databases[0].replicas[0].age_recipients[0]: not a valid age recipient" in result.stderr
    bad = tmp_path / "bad.key"
    bad.write_text("AGE-SECRET-KEY-1NOTAKEY\n")
    result = replicad(
        "restore", "-o", str(tmp_path / "o.db"), "--age-identity-file", str(bad), "file:///tmp/r"
    )
    assert result.returncode == 2
    assert f"{bad}: line 1 is not an age identity" in result.stderr
    assert "NOTAKEY" not in result.stderr


# -- key rotation ----------------------------------------------------------------------------------


def _copy_replica(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _restore_with(
    identity: Path, rep: Path, out: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return replicad(
        "restore", "-o", str(out), "--age-identity-file", str(identity), *extra, rep.as_uri()
    )


def _restores_equal(identity: Path, rep: Path, out: Path, db: Path) -> None:
    result = _restore_with(identity, rep, out)
    assert result.returncode == 0, result.stderr
    assert workload.dump(out) == workload.dump(db)


def _rekey(rep: Path, old: Path, *new: str) -> subprocess.CompletedProcess[str]:
    return replicad("rekey", rep.as_uri(), "--age-identity-file", str(old), "--to", *new)


def test_rekey_rotates_and_the_old_key_no_longer_opens(
    encrypted: tuple[Path, Path, Keys, Path], tmp_path: Path
) -> None:
    source, db, keys, _ = encrypted
    rep = _copy_replica(source, tmp_path / "rep")
    result = _rekey(rep, keys.a_file, keys.b)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["rewritten"] == summary["objects"] == len(_objects(rep))
    assert all(_made_for(p) == [keys.b] for p in _objects(rep))
    _restores_equal(keys.b_file, rep, tmp_path / "b.db", db)
    old = _restore_with(keys.a_file, rep, tmp_path / "a.db")
    assert old.returncode == 1
    assert f"is encrypted for {keys.b}" in old.stderr
    again = _rekey(rep, keys.a_file, keys.b)
    assert again.returncode == 0
    assert json.loads(again.stdout.splitlines()[-1])["rewritten"] == 0


@pytest.fixture(scope="module")
def many_objects(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Keys]:
    """A replica of about 150 small objects encrypted for key A: a 20 ms sync interval makes
    nearly every transaction its own segment.
    """
    tmp = tmp_path_factory.mktemp("many")
    keys = Keys(tmp)
    db, rep = tmp / "app.db", tmp / "replica"
    config = _config(tmp, db, rep, [keys.a], sync_interval=0.02)
    _replicate_history(config, db, rep, count=150, rate=30)
    return rep, db, keys


def _wchan(pid: int) -> str:
    """Where the process sleeps in the kernel: `anon_pipe_write`, `pipe_write` or (older
    kernels) `pipe_wait` when blocked writing to a full pipe.
    """
    return Path(f"/proc/{pid}/wchan").read_text()


def test_rekey_resumes_after_a_crash(many_objects: tuple[Path, Path, Keys], tmp_path: Path) -> None:
    """SIGKILL while rekey is stuck half-way (its progress output fills a pipe nobody reads:
    a deterministic place to crash), then the same command again.
    """
    source, db, keys = many_objects
    rep = _copy_replica(source, tmp_path / "rep")
    total = len(_objects(rep))
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # room for about 40 progress lines
    cmd = [sys.executable, "-m", "replicad", "rekey", rep.as_uri(), "--concurrency", "1"]
    cmd += ["--age-identity-file", str(keys.a_file), "--to", keys.b, keys.ssh]
    try:
        proc = subprocess.Popen(cmd, stdout=write_end, env=clean_env(), cwd=ROOT)
        os.close(write_end)
        wait_for(lambda: "pipe_w" in _wchan(proc.pid), 60, "rekey blocked on its output")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        os.close(read_end)
    new_set = sorted([keys.b, keys.ssh_label])
    done = [p for p in _objects(rep) if _made_for(p) == new_set]
    # How many fit before the pipe fills depends on the length of a progress line (its key).
    assert 0 < len(done) < total, f"{len(done)} of {total}: the crash came in the middle"
    assert not list(rep.glob("**/.tmp-*")), "no torn temporary object is visible"
    both = ["--age-identity-file", str(keys.b_file)]
    halfway = _restore_with(keys.a_file, rep, tmp_path / "half.db", *both)
    assert halfway.returncode == 0, "mid-rotation, old and new identities together restore"
    resumed = replicad(
        "rekey", rep.as_uri(), "--age-identity-file", str(keys.a_file), "--to", keys.ssh, keys.b
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.splitlines()[-1])
    assert summary["already_current"] >= len(done)
    assert summary["rewritten"] + summary["already_current"] == total
    assert all(_made_for(p) == new_set for p in _objects(rep))
    _restores_equal(keys.ssh_file, rep, tmp_path / "r.db", db)


def test_rekey_with_the_daemon_running(tmp_path: Path) -> None:
    """Rotation as the runbook says: the daemon gets the new recipient (and, holding no key,
    snapshots on restart), then rekey rewrites the history while the writer and daemon go on.
    """
    keys = Keys(tmp_path)
    db, rep = tmp_path / "app.db", tmp_path / "rep"
    _replicate_history(_config(tmp_path, db, rep, [keys.a]), db, rep, count=60, rate=100)
    new_config = _config(tmp_path, db, rep, [keys.b])
    daemon = start_daemon(["-c", str(new_config)], tmp_path / "d2.log")
    try:
        wait_for(lambda: len(list(rep.glob("snapshots/*.snap"))) == 2, 30, "restart snapshot")
        writer = subprocess.Popen(
            [sys.executable, "-c", _MORE_WRITES, str(db)], env=clean_env(), cwd=ROOT
        )
        try:
            result = _rekey(rep, keys.a_file, keys.b)
        finally:
            assert writer.wait(timeout=60) == 0
        assert result.returncode == 0, result.stderr
    finally:
        assert stop(daemon) == 0, (tmp_path / "d2.log").read_text()[-3000:]
    assert all(_made_for(p) == [keys.b] for p in _objects(rep))
    log = (tmp_path / "d2.log").read_text()
    assert "compaction is off" in log
    _restores_equal(keys.b_file, rep, tmp_path / "out.db", db)
    # The oldest TXID (history from before the rotation) restores with the new key too.
    first = _restore_with(keys.b_file, rep, tmp_path / "first.db", "--txid", "1")
    assert first.returncode == 0, first.stderr


_MORE_WRITES = """
import sqlite3, sys
sys.path.insert(0, '.')
from tests import workload
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
for k in range(1000, 1200):
    workload.apply_txn(conn, 9, k)
conn.close()
"""
