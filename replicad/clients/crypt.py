r"""Client-side encryption with age: a `ReplicaClient` that encrypts whole objects on the way in
and decrypts them on the way out, so replication, compaction and restore never see ciphertext.

Every object is first encoded (and compressed) by `replicad.format`, then encrypted as one age
file for the replica's recipients (X25519 `age1...` keys or SSH public keys).  Each object is
independently decryptable with any one matching identity.  Keys (object names) stay plaintext:
restore plans from a listing.  Lease objects hold no user data and stay plaintext too, so a
daemon without a private key can still read them.

An encrypted object is a short plaintext prefix, then the age file::

    replicad-age/1\\n
    R age1qyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqs3290gq\\n
    R ssh-ed25519 SHA256:4Mqh8Z0OOgJz9vKzM+wvH+NXiOQ750VRH2B8JQPNpes\\n
    \\n
    age-encryption.org/v1 ...

The `R` lines name the recipients it was made for (public keys, or SSH fingerprints as
`ssh-keygen -l` prints them): age's own header does not say, and a wrong or missing identity
must be answered with "made for these keys".  They are public and not authenticated; a reader
trusts only age's decryption, never these lines.

Objects are encrypted whole, so there is no ranged read of an encrypted object: a read always
starts at the object's first byte and decrypts as it streams (`_DecryptPipe`), and a reader
that wants a piece in the middle fetches everything before it.  Encrypting a file on upload
goes through a 0600 temporary file in `spool_dir`.

Mixing is refused: a client with recipients or identities refuses a plaintext object, and one
without refuses an encrypted object (`ObjectLockedError`), so one lineage is all one or the
other.  age gives confidentiality, not authenticity: anyone holding the public recipients can
encrypt an object.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import tempfile
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pyrage
from pyrage import ssh, x25519

from replicad.clients.base import ClientStats, ObjectInfo, ReplicaClient
from replicad.errors import ConfigError, FormatError, ObjectLockedError
from replicad.lease import is_lease_key
from replicad.private import create_private, unpredictable_name

MAGIC = b"replicad-age/1\n"
#: Largest plaintext prefix accepted (it lists recipients; hundreds fit).
MAX_PREFIX = 64 << 10
#: Name of the worker threads that decrypt streamed objects.
DECRYPT_THREAD = "replicad-decrypt"
#: Plaintext pieces a decrypting worker may have handed on and not yet had taken.
_PIPE_DEPTH = 4
#: Failed encrypted puts remembered, so a retry of the same key sends the same bytes (files
#: stay on disk; in-memory ciphertexts are also bounded in bytes).
_RETRY_MEMORY = 8
_RETRY_MEMORY_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class AgeRecipient:
    """A public key objects are encrypted for, and the label the object prefix records."""

    label: str
    key: Any


@dataclass(frozen=True, slots=True)
class AgeIdentity:
    """A private key, and the label of its public half (as `AgeRecipient.label`)."""

    label: str
    key: Any


def parse_recipient(text: str) -> AgeRecipient:
    """An `age1...` X25519 key or an `ssh-ed25519`/`ssh-rsa` public key line; `ValueError` if
    neither (the message never repeats the text, which is public anyway, beyond its kind).
    """
    text = text.strip()
    try:
        if text.startswith("age1"):
            return AgeRecipient(text, x25519.Recipient.from_str(text))
        if text.startswith("ssh-"):
            kind, blob = text.split()[:2]
            return AgeRecipient(
                _ssh_label(kind, base64.b64decode(blob)), ssh.Recipient.from_str(text)
            )
    except (pyrage.RecipientError, ValueError) as exc:
        raise ValueError(f"not a valid age recipient ({exc})") from exc
    raise ValueError("not an age recipient: expected age1... or an ssh-ed25519/ssh-rsa public key")


def load_identities(path: Path) -> list[AgeIdentity]:
    """The identities in an age identity file (`AGE-SECRET-KEY-1...` lines) or an unencrypted
    OpenSSH private key.  Raises `ConfigError` naming the file, never showing its content.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the age identity file: {exc.strerror}") from exc
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
        try:
            ssh_key = ssh.Identity.from_buffer(data)
        except pyrage.IdentityError as exc:
            raise ConfigError(
                f"{path}: not a usable SSH private key ({exc})",
                hint="a passphrase-protected key must be decrypted first (ssh-keygen -p)",
            ) from exc
        return [AgeIdentity(_ssh_private_label(data) or f"ssh key {path}", ssh_key)]
    identities = []
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = x25519.Identity.from_str(line)
        except pyrage.IdentityError:
            raise ConfigError(
                f"{path}: line {number} is not an age identity (AGE-SECRET-KEY-1...)"
            ) from None
        identities.append(AgeIdentity(str(key.to_public()), key))
    if not identities:
        raise ConfigError(f"{path}: no age identity in the file")
    return identities


def encryption_prefix(recipients: Sequence[AgeRecipient]) -> bytes:
    """The plaintext prefix naming `recipients`."""
    lines = b"".join(f"R {r.label}\n".encode() for r in recipients)
    return MAGIC + lines + b"\n"


def parse_prefix(head: bytes, key: str) -> tuple[list[str], int] | None:
    """(recipient labels, prefix length) of an encrypted object starting with `head`; None if
    the object is plaintext.  `head` must hold the whole prefix (`MAX_PREFIX` bytes suffice).
    """
    if not head.startswith(MAGIC):
        return None
    end = head.find(b"\n\n", len(MAGIC) - 1)
    if end < 0:
        raise FormatError(f"encrypted object {key}: its recipient list is truncated or too long")
    labels = []
    for line in head[len(MAGIC) : end].decode("utf-8", "replace").splitlines():
        if not line.startswith("R "):
            raise FormatError(f"encrypted object {key}: unreadable recipient line")
        labels.append(line[2:])
    return labels, end + 2


class CryptClient:
    """A `ReplicaClient` around another that encrypts for `recipients` (none: writes stay
    plaintext) and decrypts with `identities` (none: an encrypted object is `ObjectLockedError`).

    With either set, a plaintext object (other than a lease) is refused: lineages never mix.
    """

    def __init__(
        self,
        inner: ReplicaClient,
        *,
        recipients: Sequence[AgeRecipient] = (),
        identities: Sequence[AgeIdentity] = (),
        spool_dir: Path | None = None,
    ) -> None:
        self.inner = inner
        self.recipients = list(recipients)
        self.identities = list(identities)
        self.spool_dir = spool_dir
        self._prefix = encryption_prefix(self.recipients)
        # key -> (plaintext fingerprint, ciphertext): failed puts, resent unchanged on retry.
        self._unsent: dict[str, tuple[bytes, bytes | Path]] = {}

    @property
    def encrypted(self) -> bool:
        """Whether this replica's lineage is encrypted (plaintext objects are refused)."""
        return bool(self.recipients or self.identities)

    # -- the protocol: pass-through --------------------------------------------------------

    @property
    def stats(self) -> ClientStats:
        """The wrapped client's counters (ciphertext bytes)."""
        return self.inner.stats

    @property
    def url(self) -> str:
        """The wrapped client's URL."""
        return self.inner.url

    @property
    def supports_create_only(self) -> bool:
        """As the wrapped client."""
        return self.inner.supports_create_only

    async def list_objects(
        self, prefix: str = "", *, start_after: str | None = None, end_before: str | None = None
    ) -> list[ObjectInfo]:
        """As the wrapped client (sizes are of the stored, encrypted objects)."""
        return await self.inner.list_objects(prefix, start_after=start_after, end_before=end_before)

    async def list_dirs(self, prefix: str = "") -> list[str]:
        """As the wrapped client."""
        return await self.inner.list_dirs(prefix)

    async def delete_objects(self, keys: Sequence[str]) -> None:
        """As the wrapped client."""
        await self.inner.delete_objects(keys)

    async def close(self) -> None:
        """Close the wrapped client and forget unsent ciphertexts."""
        for _, sealed in self._unsent.values():
            if isinstance(sealed, Path):
                sealed.unlink(missing_ok=True)
        self._unsent.clear()
        await self.inner.close()

    # -- writes ------------------------------------------------------------------------------

    async def put_object(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """Encrypt `data` for the recipients (if any) and store it."""
        if not self.recipients or is_lease_key(key):
            await self.inner.put_object(key, data, create_only=create_only)
            return
        fingerprint = hashlib.sha256(data).digest()
        sealed = self._resend(key, fingerprint)
        if not isinstance(sealed, bytes):
            sealed = self._prefix + await asyncio.to_thread(pyrage.encrypt, data, self._keys())
        try:
            await self.inner.put_object(key, sealed, create_only=create_only)
        except BaseException:
            self._remember(key, fingerprint, sealed)
            raise

    async def put_file(self, key: str, path: Path, *, create_only: bool = False) -> None:
        """Encrypt the file's contents (streaming, into a 0600 temporary file) and store them."""
        if not self.recipients:
            await self.inner.put_file(key, path, create_only=create_only)
            return
        info = await asyncio.to_thread(path.stat)
        fingerprint = f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}".encode()
        sealed = self._resend(key, fingerprint)
        if not isinstance(sealed, Path):
            sealed = await asyncio.to_thread(self._seal_file, path)
        try:
            await self.inner.put_file(key, sealed, create_only=create_only)
        except BaseException:
            self._remember(key, fingerprint, sealed)
            raise
        sealed.unlink(missing_ok=True)

    def _seal_file(self, path: Path) -> Path:
        directory = self.spool_dir or Path(tempfile.gettempdir())
        sealed = directory / unpredictable_name("sealed")
        try:
            with path.open("rb") as source, create_private(sealed) as out:
                out.write(self._prefix)
                pyrage.encrypt_io(source, cast(Any, out), self._keys())
        except BaseException:
            sealed.unlink(missing_ok=True)
            raise
        return sealed

    def _resend(self, key: str, fingerprint: bytes) -> bytes | Path | None:
        """The ciphertext of an earlier failed put of the same content under `key`: a retry
        must send the same bytes, or a create-only retry of a put that did land would look
        like another writer.
        """
        earlier = self._unsent.pop(key, None)
        if earlier is None:
            return None
        if earlier[0] == fingerprint:
            return earlier[1]
        if isinstance(earlier[1], Path):
            earlier[1].unlink(missing_ok=True)
        return None

    def _remember(self, key: str, fingerprint: bytes, sealed: bytes | Path) -> None:
        self._unsent[key] = (fingerprint, sealed)
        while len(self._unsent) > _RETRY_MEMORY or self._unsent_bytes() > _RETRY_MEMORY_BYTES:
            _, oldest = self._unsent.pop(next(iter(self._unsent)))
            if isinstance(oldest, Path):
                oldest.unlink(missing_ok=True)

    def _unsent_bytes(self) -> int:
        return sum(len(sealed) for _, sealed in self._unsent.values() if isinstance(sealed, bytes))

    def _keys(self) -> list[Any]:
        return [r.key for r in self.recipients]

    # -- reads -------------------------------------------------------------------------------

    async def get_object(self, key: str) -> bytes:
        """The object's plaintext."""
        data = await self.inner.get_object(key)
        if is_lease_key(key):
            return data
        parsed = parse_prefix(data[:MAX_PREFIX], key)
        if parsed is None:
            self._check_plaintext_allowed(key)
            return data
        labels, start = parsed
        self._check_identities(key, labels)
        try:
            return await asyncio.to_thread(
                pyrage.decrypt, data[start:], [i.key for i in self.identities]
            )
        except pyrage.DecryptError as exc:
            raise self._decrypt_error(key, labels, exc) from exc

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from offset `start` of the object's plaintext.  An encrypted object
        has no ranged read (age encrypts it whole), so it is read and decrypted from its first
        byte; a plaintext one is read by range from the store.
        """
        if not self.recipients and not self.identities:
            return bytes(await self.inner.get_range(key, start, length))
        return (await self.get_object(key))[start : start + length]

    async def iter_object(self, key: str, *, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The object's plaintext in chunks of at most `chunk_size`; an encrypted object is
        decrypted as it streams (`_DecryptPipe`), each piece only once age has verified it.
        """
        chunks = self.inner.iter_object(key, chunk_size=chunk_size)
        head = b""
        if not is_lease_key(key):
            async for chunk in chunks:
                head += chunk
                if len(head) >= len(MAGIC):
                    break
            if head.startswith(MAGIC):
                # Closed with us, so a reader that stops early stops the worker thread too.
                async with contextlib.aclosing(
                    self._decrypted(key, head, chunks, chunk_size)
                ) as plain:
                    async for chunk in plain:
                        yield chunk
                return
            if head:
                self._check_plaintext_allowed(key)
        for start in range(0, len(head), chunk_size):
            yield head[start : start + chunk_size]
        async for chunk in chunks:
            yield chunk

    async def _decrypted(
        self, key: str, head: bytes, chunks: AsyncIterator[bytes], chunk_size: int
    ) -> AsyncGenerator[bytes, None]:
        while b"\n\n" not in head[len(MAGIC) - 1 :] and len(head) < MAX_PREFIX:
            chunk = await anext(chunks, b"")
            if not chunk:
                break
            head += chunk
        parsed = parse_prefix(head, key)
        assert parsed is not None  # the head starts with MAGIC
        labels, start = parsed
        self._check_identities(key, labels)
        pipe = _DecryptPipe(asyncio.get_running_loop(), head[start:], chunks, chunk_size)
        worker = threading.Thread(
            target=pipe.run,
            args=([i.key for i in self.identities],),
            name=DECRYPT_THREAD,
            daemon=True,
        )
        worker.start()
        try:
            while (item := await pipe.take()) is not None:
                yield item
        except (pyrage.DecryptError, OSError) as exc:  # pyrage's stream reports damage as I/O
            raise self._decrypt_error(key, labels, exc) from exc
        finally:
            pipe.stop()
            await pipe.stopped()
            # Its last act was to tell us so: the join is over in microseconds.
            worker.join()

    def _check_plaintext_allowed(self, key: str) -> None:
        if self.encrypted:
            raise FormatError(
                f"object {key} in {self.url} is not encrypted, but this replica is configured "
                "for age encryption: refusing to mix encrypted and plaintext objects in one "
                "lineage",
                hint="replicate to a new prefix, or encrypt the old objects in place with "
                "`replicad rekey URL --to RECIPIENT`",
            )

    def _check_identities(self, key: str, labels: list[str]) -> None:
        if not self.identities:
            raise self._locked(key, labels, "no identity was given")

    def _decrypt_error(self, key: str, labels: list[str], exc: Exception) -> FormatError:
        """A wrong key (`ObjectLockedError`), or damage found by age's authentication."""
        if "no matching keys" in str(exc).lower():
            return self._locked(key, labels, "none of them is a recipient")
        return FormatError(
            f"encrypted object {key} in {self.url} is damaged: {exc}",
            hint="the object was truncated or altered after it was written; restore an "
            "earlier TXID or from another replica",
        )

    def _locked(self, key: str, labels: list[str], why: str) -> ObjectLockedError:
        made_for = ", ".join(labels) or "unknown recipients"
        tried = ", ".join(i.label for i in self.identities) or "none"
        return ObjectLockedError(
            f"object {key} in {self.url} is encrypted for {made_for}; the identities given "
            f"({tried}) cannot open it: {why}",
            hint="pass --age-identity-file with the private key of one of those recipients "
            "(or set age_identity_file for this replica)",
        )


class _Stopped(Exception):
    """Raised inside the worker thread to abandon a decryption nobody reads any more."""


class _DecryptPipe:
    """Streaming decryption: `pyrage.decrypt_io` runs in a worker thread, reading ciphertext
    that it pulls from the object's async iterator (through the event loop) and writing
    plaintext that reaches the event loop in pieces of `chunk_size`, at most `_PIPE_DEPTH`
    of them in flight.  age authenticates every 64 KiB chunk, so nothing unauthenticated is
    handed on; a truncated or altered object fails at the chunk where it stops being valid.

    Its own thread rather than the default executor: restore reads several objects at once,
    and a pool thread parked on a pipe would starve the file backend's reads.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        first: bytes,
        chunks: AsyncIterator[bytes],
        chunk_size: int,
    ) -> None:
        self._loop = loop
        self._chunks = chunks
        self._view = memoryview(first)
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._out: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._room = threading.Semaphore(_PIPE_DEPTH)
        self._stop = threading.Event()
        self._done = asyncio.Event()
        #: What reading the object raised: pyrage would blur it into an I/O error.
        self._failure: BaseException | None = None

    # -- the worker thread's side ----------------------------------------------------------

    def run(self, identities: list[Any]) -> None:
        """Decrypt everything (worker thread); ends with None or the exception in the queue."""
        result: BaseException | None = None
        try:
            pyrage.decrypt_io(cast(Any, self), cast(Any, self), identities)
            if self._buffer:
                self._put(bytes(self._buffer))
        except BaseException as exc:  # handed to the reader, who raises it
            result = self._failure or exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._finish, result)

    def read(self, size: int = -1) -> bytes:
        """Ciphertext for pyrage; b"" at the end of the object."""
        while not self._view:
            if self._stop.is_set():
                raise _Stopped
            try:
                chunk = asyncio.run_coroutine_threadsafe(_next(self._chunks), self._loop).result()
            except BaseException as exc:
                self._failure = exc
                raise
            if chunk is None:
                return b""
            self._view = memoryview(chunk)
        size = len(self._view) if size < 0 else size
        piece, self._view = self._view[:size], self._view[size:]
        return bytes(piece)

    def write(self, data: bytes) -> int:
        """Plaintext from pyrage, passed on in `chunk_size` pieces."""
        self._buffer += data
        while len(self._buffer) >= self._chunk_size:
            self._put(bytes(self._buffer[: self._chunk_size]))
            del self._buffer[: self._chunk_size]
        return len(data)

    def flush(self) -> None:
        """Nothing buffered beyond `_buffer` (pyrage may call it)."""

    def _put(self, item: bytes) -> None:
        while not self._room.acquire(timeout=0.1):
            if self._stop.is_set():
                raise _Stopped
        self._loop.call_soon_threadsafe(self._out.put_nowait, item)

    # -- the event loop's side -------------------------------------------------------------

    def _finish(self, result: BaseException | None) -> None:
        self._out.put_nowait(result)
        self._done.set()

    async def take(self) -> bytes | None:
        """The next plaintext piece; None at the end; raises what decryption raised."""
        item = await self._out.get()
        if isinstance(item, BaseException):
            raise item
        if item is not None:
            self._room.release()
        return item

    def stop(self) -> None:
        """Ask the worker to give up (the reader went away)."""
        self._stop.set()

    async def stopped(self) -> None:
        """Wait until the worker has returned."""
        await self._done.wait()


async def _next(chunks: AsyncIterator[bytes]) -> bytes | None:
    return await anext(chunks, None)


def recipients_of_head(head: bytes, key: str) -> list[str] | None:
    """The recipient labels an object starting with `head` was encrypted for; None if it is
    plaintext.
    """
    parsed = parse_prefix(head, key)
    return None if parsed is None else parsed[0]


def _ssh_label(kind: str, blob: bytes) -> str:
    """`ssh-ed25519 SHA256:...`: the key type and the fingerprint `ssh-keygen -l` shows."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"{kind} SHA256:{digest}"


def _ssh_private_label(data: bytes) -> str | None:
    """The label of an OpenSSH private key's public half, read from the key file's header
    (stored there unencrypted), or None if the layout is not the one expected.
    """
    try:
        body = b"".join(
            line.strip()
            for line in data.splitlines()
            if line.strip() and not line.startswith(b"-----")
        )
        raw = io.BytesIO(base64.b64decode(body))
        if raw.read(15) != b"openssh-key-v1\0":
            return None
        for _ in range(3):  # cipher name, KDF name, KDF options
            raw.read(int.from_bytes(raw.read(4), "big"))
        if int.from_bytes(raw.read(4), "big") < 1:
            return None
        blob = raw.read(int.from_bytes(raw.read(4), "big"))
        kind = blob[4 : 4 + int.from_bytes(blob[:4], "big")].decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return _ssh_label(kind, blob)
