"""Key rotation: re-encrypt a replica's history in place for a new set of age recipients.

`Rekeyer.run()` walks the replica's objects, a few at a time (`concurrency`), in bounded
memory (each object passes through 0600 temporary files, never whole in memory):

1. read the object's plaintext prefix; an object already encrypted for exactly the new set is
   skipped, so a run that crashed or was interrupted is resumed by running it again (no
   journal: the objects themselves say how far it got);
2. download it, decrypt it with the old identities (a plaintext object is taken as it is:
   rekey also encrypts a plaintext replica), and check that the plaintext is the replicad
   object its name says (header kind and TXID), so garbage is never re-encrypted;
3. encrypt it for the new recipients and replace the object under the same key with one
   atomic write (a file replica renames a complete temporary file over it; an S3 PUT replaces
   the whole object or nothing), so a crash leaves the old or the new object, never a torn one;
4. read the stored object back and compare its SHA-256 with what was written, and when one of
   the identities given is also a new recipient, decrypt it again and compare the plaintext.

Keys must stay the same (restore finds objects by name), so the replacement cannot be
create-only.  The daemon may keep running: objects it writes for the new recipients meanwhile
are skipped, and an object that retention or compaction deletes during the walk is skipped
when it is gone before step 3; if it goes between the check and the write, the write puts a
valid, redundant copy back, which retention removes again.  Objects the daemon still writes
for the old recipients are found by a final check and rewritten in a further pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import pyrage

from replicad.clients.base import ObjectInfo, ReplicaClient
from replicad.clients.crypt import (
    MAX_PREFIX,
    AgeIdentity,
    AgeRecipient,
    encryption_prefix,
    parse_prefix,
)
from replicad.errors import FormatError, ObjectLockedError, ObjectNotFoundError, ReplicadError
from replicad.format import HEADER_SIZE, decode_header
from replicad.lease import is_lease_key
from replicad.position import parse_key
from replicad.private import create_private, unpredictable_name

#: Objects rewritten at once: most are small, so latency, not bandwidth, bounds a rekey.
DEFAULT_CONCURRENCY = 4
#: Passes over the replica before giving up on objects written meanwhile for old recipients.
MAX_PASSES = 3
_COPY = 1 << 20


@dataclass
class RekeyResult:
    """What a rekey did."""

    objects: int = 0
    rewritten: int = 0
    already_current: int = 0
    vanished: int = 0
    bytes_rewritten: int = 0
    seconds: float = 0.0
    #: Keys still not encrypted for the new recipients after the last pass.
    stragglers: list[str] = field(default_factory=list)


class Rekeyer:
    """Re-encrypts one replica's objects for `recipients` (see the module docstring)."""

    def __init__(
        self,
        client: ReplicaClient,
        *,
        identities: Sequence[AgeIdentity],
        recipients: Sequence[AgeRecipient],
        spool_dir: Path | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        on_object: Callable[[str, str], None] | None = None,
    ) -> None:
        if not recipients:
            raise ValueError("rekey needs at least one new recipient")
        self.client = client
        self.identities = list(identities)
        self.recipients = list(recipients)
        self.spool_dir = spool_dir or Path(tempfile.gettempdir())
        self.on_object = on_object
        self.concurrency = concurrency
        self._wanted = sorted(r.label for r in self.recipients)
        self._prefix = encryption_prefix(self.recipients)
        self._verifiers = [i for i in self.identities if i.label in self._wanted]

    async def run(self) -> RekeyResult:
        """Rewrite every object not yet encrypted for the new recipients."""
        started = time.monotonic()
        result = RekeyResult()
        done: set[str] = set()
        todo = await self._objects()
        result.objects = len(todo)
        for _ in range(MAX_PASSES):
            limit = asyncio.Semaphore(self.concurrency)
            async with asyncio.TaskGroup() as tg:
                for info in todo:
                    tg.create_task(self._rekey_counted(info, result, done, limit))
            # Objects that appeared meanwhile: a running daemon's, normally already for the
            # new recipients (one prefix read each); anything else takes another pass.
            todo = [
                info
                for info in await self._objects()
                if info.key not in done and not await self._current(info.key)
            ]
            if not todo:
                break
        result.stragglers = [info.key for info in todo]
        result.seconds = time.monotonic() - started
        return result

    async def _rekey_counted(
        self, info: ObjectInfo, result: RekeyResult, done: set[str], limit: asyncio.Semaphore
    ) -> None:
        async with limit:
            outcome = await self.rekey_object(info.key)
        if outcome == "rewritten":
            result.rewritten += 1
            result.bytes_rewritten += info.size
        elif outcome == "current":
            result.already_current += 1
        else:
            result.vanished += 1
        if outcome != "vanished":
            done.add(info.key)
        if self.on_object is not None:
            self.on_object(info.key, outcome)

    async def rekey_object(self, key: str) -> str:
        """Rewrite one object: `rewritten`, `current` (nothing to do) or `vanished`."""
        try:
            if await self._current(key):
                return "current"
            with self._temp() as (old, _), self._temp() as (plain, _):
                await self._download(key, old)
                await asyncio.to_thread(self._open, key, old, plain)
                with self._temp() as (new, new_path):
                    digest = await asyncio.to_thread(self._seal, plain, new)
                    if not await self._exists(key):
                        return "vanished"
                    await self.client.put_file(key, new_path)
                await self._verify(key, digest)
        except ObjectNotFoundError:
            return "vanished"
        return "rewritten"

    # -- steps -----------------------------------------------------------------------------------

    async def _objects(self) -> list[ObjectInfo]:
        """replicad's objects (not leases, not foreign files), sorted by key."""
        return [
            info
            for info in await self.client.list_objects()
            if not is_lease_key(info.key) and parse_key(info.key) is not None
        ]

    async def _current(self, key: str) -> bool:
        """Whether the object is already encrypted for exactly the new recipients."""
        head = b""
        async for chunk in self.client.iter_object(key, chunk_size=MAX_PREFIX):
            head += chunk
            break
        parsed = parse_prefix(head, key)
        return parsed is not None and sorted(parsed[0]) == self._wanted

    async def _exists(self, key: str) -> bool:
        listing = await self.client.list_objects(key)
        return any(info.key == key for info in listing)

    async def _download(self, key: str, sink: IO[bytes]) -> None:
        async for chunk in self.client.iter_object(key, chunk_size=_COPY):
            await asyncio.to_thread(sink.write, chunk)
        await asyncio.to_thread(sink.flush)

    def _open(self, key: str, sealed: IO[bytes], plain: IO[bytes]) -> None:
        """Decrypt (or copy, for a plaintext object) `sealed` into `plain`; check that it is
        the replicad object its key names (blocking).
        """
        sealed.seek(0)
        parsed = parse_prefix(sealed.read(MAX_PREFIX), key)
        if parsed is None:
            sealed.seek(0)
            _copy(sealed, plain)
        else:
            labels, start = parsed
            sealed.seek(start)
            try:
                pyrage.decrypt_io(
                    cast(Any, sealed), cast(Any, plain), [i.key for i in self.identities]
                )
            except pyrage.DecryptError as exc:
                tried = ", ".join(i.label for i in self.identities) or "none"
                raise ObjectLockedError(
                    f"object {key} in {self.client.url} is encrypted for {', '.join(labels)}; "
                    f"the old identities given ({tried}) cannot open it: {exc}",
                    hint="pass --age-identity-file once per old key the history was made for",
                ) from exc
        plain.flush()
        plain.seek(0)
        header = decode_header(plain.read(HEADER_SIZE))
        name = parse_key(key)
        if name is None or header.kind is not name.kind or header.last_txid != name.last_txid:
            raise FormatError(f"object {key} in {self.client.url} does not match its name")

    def _seal(self, plain: IO[bytes], out: IO[bytes]) -> str:
        """Encrypt `plain` for the new recipients into `out`; the SHA-256 of what was written."""
        plain.seek(0)
        out.write(self._prefix)
        pyrage.encrypt_io(cast(Any, plain), cast(Any, out), [r.key for r in self.recipients])
        out.flush()
        out.seek(0)
        return _sha256(out)

    async def _verify(self, key: str, digest: str) -> None:
        """The stored object is byte for byte what was written, and (when an identity given
        is a new recipient) it decrypts.
        """
        with self._temp() as (back, _):
            await self._download(key, back)
            back.seek(0)
            if await asyncio.to_thread(_sha256, back) != digest:
                raise ReplicadError(
                    f"object {key} in {self.client.url} does not read back as written",
                    hint="the storage changed it, or another process wrote it meanwhile; run "
                    "rekey again (it resumes) and check the replica's storage",
                )
            if self._verifiers:
                with self._temp() as (plain, _):
                    opener = Rekeyer(
                        self.client, identities=self._verifiers, recipients=self.recipients
                    )
                    await asyncio.to_thread(opener._open, key, back, plain)

    def _temp(self) -> _TempFile:
        return _TempFile(self.spool_dir)


class _TempFile:
    """A 0600 file under an unpredictable name, open read-write, removed on exit."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / unpredictable_name("rekey")
        self.file: IO[bytes] | None = None

    def __enter__(self) -> tuple[IO[bytes], Path]:
        self.file = create_private(self.path, read=True)
        return self.file, self.path

    def __exit__(self, *exc_info: object) -> None:
        assert self.file is not None
        self.file.close()
        self.path.unlink(missing_ok=True)


def _copy(source: IO[bytes], sink: IO[bytes]) -> None:
    while chunk := source.read(_COPY):
        sink.write(chunk)


def _sha256(source: IO[bytes]) -> str:
    sha = hashlib.sha256()
    while chunk := source.read(_COPY):
        sha.update(chunk)
    return sha.hexdigest()
