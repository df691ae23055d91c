"""A replica in an S3-compatible bucket (AWS S3, Cloudflare R2, MinIO, rclone serve s3, moto).

Built on aiobotocore with an explicit botocore `Config`, so behaviour does not drift with the
SDK's defaults:

* **Checksums**: `request_checksum_calculation` and `response_checksum_validation` are
  `"when_required"`.  Since botocore 1.36 the default is to send CRC32 checksums, over HTTPS as
  `aws-chunked` uploads with trailing checksums, which Cloudflare R2 and other S3-compatible
  servers reject.  Instead every PUT and part upload carries a `Content-MD5` header, which all
  of them verify (moto accepts it without checking).
* **Retries**: botocore's `standard` mode retries throttling, 5xx, timeouts and dropped
  connections up to `max_attempts` times with jittered backoff.  Whatever is still failing after
  that is translated here: transient failures become `ReplicaUnavailableError`, credential,
  permission and missing-bucket failures `ReplicaAccessError` (with a hint), a missing key
  `ObjectNotFoundError`.  Messages name the bucket and endpoint, never a credential.
* **Fencing**: `put_object(create_only=True)` sends `If-None-Match: *`; a `412` becomes
  `ObjectExistsError`.  A server that ignores the header (rclone serve s3 does) silently
  overwrites, and a client cannot detect that, so `conditional_writes=False` declares such a
  server and makes `supports_create_only` false.  A `412` can also be our own earlier attempt,
  which landed although its response was lost and the request was retried (by botocore, or
  invisibly by aiohttp, which resends an idempotent request once when a kept-alive connection
  drops).  So before reporting a conflict the object's ETag is compared with the MD5 of what
  we sent; identical bytes count as success.  A lost CompleteMultipartUpload response is
  handled the same way (retry -> `NoSuchUpload` -> compare the multipart ETag).
* **Credentials**: explicit keys win; otherwise botocore's chain (environment, `profile` or the
  default profile, container and instance metadata).
* **Requests** are counted per HTTP attempt (retries included) through botocore's
  `before-send` event, under the `ClientStats` operation names.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import hashlib
import itertools
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import IO, Any, Concatenate, ParamSpec, TypeVar, cast
from urllib.parse import quote, urlsplit

import aiohttp
import structlog
from aiobotocore.session import AioSession
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
    SSLError,
)

from replicad.clients.base import ClientStats, ObjectInfo, check_dir_prefix, keys_between
from replicad.errors import (
    ConfigError,
    ObjectExistsError,
    ObjectNotFoundError,
    ReplicaAccessError,
    ReplicaError,
    ReplicaUnavailableError,
)

MIB = 1 << 20
#: Multipart part size: S3's minimum is 5 MiB; 8 MiB keeps memory modest and requests few.
DEFAULT_PART_SIZE = 8 * MIB
MIN_PART_SIZE = 5 * MIB
#: S3 allows at most this many parts; larger files get proportionally larger parts.
MAX_PARTS = 10_000
#: Parts uploaded in parallel; memory for one upload is about part_size x concurrency.
DEFAULT_CONCURRENCY = 4
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds without a byte from the server before an attempt is abandoned and retried.
DEFAULT_READ_TIMEOUT = 60.0
#: Total attempts per request in botocore's standard retry mode (first try included).
DEFAULT_MAX_ATTEMPTS = 5
#: Keys per ListObjectsV2 page; 1000 is S3's maximum (some servers cap lower).
DEFAULT_LIST_PAGE_SIZE = 1000
#: Keys per DeleteObjects request, S3's maximum.
DELETE_BATCH = 1000
#: Default streaming chunk for `iter_object`.
CHUNK_SIZE = MIB

# botocore operation name -> ClientStats operation name.
_OPERATIONS = {
    "PutObject": "PUT",
    "GetObject": "GET",
    "HeadObject": "HEAD",
    "ListObjectsV2": "LIST",
    "DeleteObjects": "DELETE",
    "CreateMultipartUpload": "CREATE_MULTIPART",
    "UploadPart": "UPLOAD_PART",
    "CompleteMultipartUpload": "COMPLETE_MULTIPART",
    "AbortMultipartUpload": "ABORT_MULTIPART",
}
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
    }
)
_BUCKET_CODES = frozenset({"NoSuchBucket", "InvalidBucketName", "PermanentRedirect"})
_ACCESS_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem"})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
# Failures to reach the endpoint that retrying later may fix (SSLError is handled before).
_TRANSIENT_ERRORS = (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError)

_log = structlog.get_logger()
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _counting_errors(
    method: Callable[Concatenate[S3ReplicaClient, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[S3ReplicaClient, _P], Coroutine[Any, Any, _R]]:
    """Count a public method's failure in `stats.errors`, once, by kind."""

    @functools.wraps(method)
    async def counted(client: S3ReplicaClient, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(client, *args, **kwargs)
        except ReplicaError as error:
            client.stats.count_error(error)
            raise

    return counted


class S3ReplicaClient:
    """A `ReplicaClient` storing objects under `prefix` in an S3 bucket.

    Opened by `open()` (or `async with`, or lazily by the first call); after `close()` every
    method raises `RuntimeError`.
    """

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        path_style: bool = False,
        ca_bundle: str | None = None,
        verify_tls: bool = True,
        storage_class: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        conditional_writes: bool = True,
        sign_payload: bool | None = None,
        list_page_size: int = DEFAULT_LIST_PAGE_SIZE,
    ) -> None:
        """Settings only; no connection is made until `open()`.

        `path_style` puts the bucket in the URL path (MinIO, rclone, most self-hosted servers)
        rather than the host name.  `conditional_writes` says the server enforces
        `If-None-Match` (AWS, R2, moto do).  `sign_payload` None keeps botocore's rule (sign
        the body unless HTTPS and a checksum header protect it); False saves a SHA-256 pass per
        upload over HTTPS.  `ca_bundle` None with `verify_tls` uses botocore's own resolution.
        """
        if not bucket:
            raise ValueError("bucket must not be empty")
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        if concurrency < 1 or max_attempts < 1 or not 1 <= list_page_size <= 1000:
            raise ValueError("concurrency and max_attempts must be >= 1, list_page_size 1-1000")
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._root = f"{self._prefix}/" if self._prefix else ""
        self._endpoint_url = endpoint_url
        self._region = region
        self._credentials = {
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
            "aws_session_token": session_token,
        }
        self._profile = profile
        self._verify: str | bool | None = (ca_bundle or None) if verify_tls else False
        self._storage_class = storage_class
        self._part_size = part_size
        self._concurrency = concurrency
        self._conditional_writes = conditional_writes
        self._list_page_size = list_page_size
        self._config = _botocore_config(
            path_style=path_style,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            sign_payload=sign_payload,
            pool_size=max(10, concurrency + 2),
        )
        self._stats = ClientStats()
        self._client: Any = None
        #: Replicas with the same endpoint, credentials and settings share one botocore client
        #: and its connection pool (`_SharedClient`): a thousand databases, one pool.
        self._share_key = (
            endpoint_url,
            region,
            access_key_id,
            secret_access_key,
            session_token,
            profile,
            self._verify,
            path_style,
            connect_timeout,
            read_timeout,
            max_attempts,
            sign_payload,
            concurrency,
        )
        self._shared: _SharedClient | None = None
        self._open_lock = asyncio.Lock()
        self._closed = False
        self._where = f"bucket {bucket!r} at {_display_endpoint(endpoint_url, region)}"

    @property
    def stats(self) -> ClientStats:
        """Counters of HTTP attempts (retries included) and payload bytes."""
        return self._stats

    @property
    def url(self) -> str:
        """`s3://bucket/prefix`, plus `?endpoint=` for a non-AWS endpoint; no credentials."""
        url = f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"
        if self._endpoint_url:
            url += "?endpoint=" + quote(_strip_userinfo(self._endpoint_url), safe=":/")
        return url

    @property
    def supports_create_only(self) -> bool:
        """The `conditional_writes` setting: whether the server enforces `If-None-Match`."""
        return self._conditional_writes

    # -- life cycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the HTTP client. Idempotent; `ConfigError` if `profile` does not exist."""
        async with self._open_lock:
            self._check_not_closed()
            if self._client is not None:
                return
            clients = _SHARED.setdefault(asyncio.get_running_loop(), {})
            shared = clients.get(self._share_key)
            if shared is None:
                shared = _SharedClient(await self._create_client())
                clients[self._share_key] = shared
            shared.users += 1
            self._shared = shared
            self._client = shared.client

    async def _create_client(self) -> tuple[Any, AsyncExitStack]:
        """A botocore client and what closes it (with its pool), when its last user closes."""
        stack = AsyncExitStack()
        try:
            session = AioSession(profile=self._profile)
            session.register_component("data_loader", _shared_data_loader())
            client = await stack.enter_async_context(
                session.create_client(
                    "s3",
                    endpoint_url=self._endpoint_url,
                    region_name=self._region,
                    verify=self._verify,
                    config=self._config,
                    **self._credentials,
                )
            )
        except ProfileNotFound as exc:
            raise ConfigError(
                f"AWS profile {self._profile!r} for {self._where} not found",
                hint="check the profile name and ~/.aws/config",
            ) from exc
        client.meta.events.register("before-send.s3", _count_attempt)
        return client, stack

    async def close(self) -> None:
        """Close connections (those of a shared client once its last user closes) and refuse
        further use. Idempotent.
        """
        async with self._open_lock:
            self._closed = True
            self._client = None
            shared, self._shared = self._shared, None
            if shared is None:
                return
            shared.users -= 1
            if shared.users == 0:
                clients = _SHARED.get(asyncio.get_running_loop(), {})
                if clients.get(self._share_key) is shared:
                    del clients[self._share_key]
                await shared.stack.aclose()

    async def __aenter__(self) -> S3ReplicaClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the ReplicaClient protocol ------------------------------------------------------------

    @_counting_errors
    async def list_objects(
        self, prefix: str = "", *, start_after: str | None = None, end_before: str | None = None
    ) -> list[ObjectInfo]:
        """Every object under `prefix` strictly between the bounds, sorted, following
        ListObjectsV2 continuation tokens until a page reaches `end_before`.
        """
        found: list[ObjectInfo] = []
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Prefix": self._root + prefix,
            "MaxKeys": self._list_page_size,
        }
        if start_after is not None:
            params["StartAfter"] = self._root + start_after
        seen: set[str] = set()
        while True:
            page = await self._call(f"LIST {params['Prefix']!r}", "list_objects_v2", **params)
            found.extend(
                ObjectInfo(item["Key"][len(self._root) :], item["Size"])
                for item in page.get("Contents", ())
            )
            token = page.get("NextContinuationToken")
            reached_end = end_before is not None and bool(found) and found[-1].key >= end_before
            if not page.get("IsTruncated") or not token or reached_end:
                return keys_between(found, start_after, end_before)
            params["ContinuationToken"] = self._next_token(params, token, seen)

    @_counting_errors
    async def list_dirs(self, prefix: str = "") -> list[str]:
        """The common prefixes under `prefix` for the delimiter "/", without the trailing "/"."""
        check_dir_prefix(prefix)
        start = len(self._root + prefix)
        names: list[str] = []
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Prefix": self._root + prefix,
            "Delimiter": "/",
            "MaxKeys": self._list_page_size,
        }
        seen: set[str] = set()
        while True:
            page = await self._call(f"LIST {params['Prefix']!r}", "list_objects_v2", **params)
            names.extend(p["Prefix"][start:-1] for p in page.get("CommonPrefixes", ()))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return sorted(names)
            params["ContinuationToken"] = self._next_token(params, token, seen)

    @_counting_errors
    async def put_object(self, key: str, data: bytes, *, create_only: bool = False) -> None:
        """One PutObject; with `create_only` (and `conditional_writes`) `If-None-Match: *`."""
        await self._put(self._root + key, data, create_only=create_only)

    @_counting_errors
    async def put_file(self, key: str, path: Path, *, create_only: bool = False) -> None:
        """Upload a local file: one PUT up to `part_size`, else a parallel multipart upload.

        With `create_only` (and `conditional_writes`) the PUT, or the multipart completion,
        carries `If-None-Match: *`.  Raises `OSError` untranslated if `path` cannot be read: a
        local problem.
        """
        size = (await asyncio.to_thread(path.stat)).st_size
        full_key = self._root + key
        if size <= self._part_size:
            data = await asyncio.to_thread(path.read_bytes)
            await self._put(full_key, data, create_only=create_only)
        else:
            part_size = max(self._part_size, -(-size // MAX_PARTS))
            await self._put_multipart(full_key, path, part_size, create_only=create_only)

    async def get_object(self, key: str) -> bytes:
        """The whole object; `ObjectNotFoundError` if it does not exist."""
        return b"".join([chunk async for chunk in self.iter_object(key)])

    async def get_range(self, key: str, start: int, length: int) -> bytes | bytearray:
        """`length` bytes from offset `start`: GetObject with ``Range: bytes=start-end``."""
        byte_range = f"bytes={start}-{start + length - 1}"
        full_key = self._root + key
        what = f"GET {full_key!r} ({byte_range})"
        # Into a buffer of the range's size: joining the chunks would hold the part twice.
        data = bytearray(length)
        filled = 0
        try:
            async with contextlib.aclosing(
                self._stream(full_key, CHUNK_SIZE, Range=byte_range, what=what)
            ) as chunks:
                async for chunk in chunks:
                    data[filled : filled + len(chunk)] = chunk  # (grows past `length` if so)
                    filled += len(chunk)
        except ReplicaError as error:
            self._stats.count_error(error)
            raise
        del data[filled:]
        if filled > length:  # a server that ignores Range sends the whole object
            del data[: min(start, filled)]
            del data[length:]
        return data

    async def iter_object(self, key: str, *, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        """Stream the GetObject body in chunks of at most `chunk_size` bytes."""
        try:
            async with contextlib.aclosing(self._stream(self._root + key, chunk_size)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except ReplicaError as error:
            self._stats.count_error(error)
            raise

    @_counting_errors
    async def delete_objects(self, keys: Sequence[str]) -> None:
        """DeleteObjects in batches of 1000; absent keys are fine, other per-key errors raise."""
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            what = f"DELETE of {len(batch)} keys under {self._root!r}"
            response = await self._call(
                what,
                "delete_objects",
                Bucket=self._bucket,
                Delete={"Objects": [{"Key": self._root + key} for key in batch], "Quiet": True},
            )
            failed = [
                e for e in response.get("Errors", ()) if e.get("Code") not in _NOT_FOUND_CODES
            ]
            if failed:
                first = failed[0]
                raise self._classify(
                    f"{what} ({len(failed)} failed, first {first.get('Key')!r})",
                    first.get("Code", ""),
                    0,
                    first.get("Message", ""),
                )

    def _next_token(self, params: dict[str, Any], token: str, seen: set[str]) -> str:
        """`token`, unless the server gave it before in this listing: it would then give the
        same pages for ever and the listing would never end, so that is an error.
        """
        if token in seen:
            raise ReplicaUnavailableError(
                f"LIST {params['Prefix']!r} in {self._where}: "
                "the server answered with a continuation token it had given before, so the "
                "listing would never end",
                hint="the S3 server is misbehaving: check its version and logs, or report it to "
                "its vendor",
            )
        seen.add(token)
        return token

    # -- single requests -----------------------------------------------------------------------

    async def _put(self, full_key: str, data: bytes, *, create_only: bool = False) -> None:
        """PutObject with Content-MD5; a 412 over identical bytes (our own lost try) is success."""
        digest = _md5(data)
        params = self._put_params(full_key) | {"Body": data, "ContentMD5": _b64(digest)}
        if create_only and self._conditional_writes:
            params["IfNoneMatch"] = "*"
        try:
            await self._call(f"PUT {full_key!r}", "put_object", **params)
        except ObjectExistsError:
            if not await self._holds(full_key, {digest.hexdigest()}):
                raise
        self._stats.bytes_uploaded += len(data)

    async def _stream(
        self, full_key: str, chunk_size: int, *, what: str | None = None, **params: Any
    ) -> AsyncGenerator[bytes, None]:
        """GetObject (with extra `params`, such as a Range), then the body chunk by chunk; the
        connection is released on exit.
        """
        what = what or f"GET {full_key!r}"
        response = await self._call(what, "get_object", Bucket=self._bucket, Key=full_key, **params)
        body = response["Body"]
        try:
            while True:
                try:
                    chunk = cast(bytes, await body.read(chunk_size))
                except _TRANSIENT_ERRORS as exc:
                    raise self._translate(exc, what) from exc
                if not chunk:
                    return
                self._stats.bytes_downloaded += len(chunk)
                yield chunk
        finally:
            body.close()

    async def _holds(self, full_key: str, etags: set[str]) -> bool:
        """Whether the object at `full_key` now has one of these ETags (holds our bytes)."""
        try:
            head = await self._call(
                f"HEAD {full_key!r}", "head_object", Bucket=self._bucket, Key=full_key
            )
        except ObjectNotFoundError:
            return False
        return str(head.get("ETag", "")).strip('"') in etags

    # -- multipart -----------------------------------------------------------------------------

    async def _put_multipart(
        self, full_key: str, path: Path, part_size: int, *, create_only: bool = False
    ) -> None:
        """Create, upload parts, complete; abort on any failure (cancellation included)."""
        what = f"multipart upload of {full_key!r}"
        upload = await self._call(what, "create_multipart_upload", **self._put_params(full_key))
        target = {"Bucket": self._bucket, "Key": full_key, "UploadId": upload["UploadId"]}
        try:
            parts, whole_md5 = await self._upload_parts(what, target, path, part_size)
            etags = {_multipart_etag(parts), whole_md5}
            await self._complete(what, target, parts, etags, create_only=create_only)
        except BaseException:
            await self._abort_upload(what, target)
            raise

    async def _upload_parts(
        self, what: str, target: dict[str, Any], path: Path, part_size: int
    ) -> tuple[list[dict[str, Any]], str]:
        """Read `path` in order and upload parts with at most `concurrency` in flight.

        Returns the parts for CompleteMultipartUpload and the MD5 of the whole file (the ETag
        servers such as rclone give a multipart object).
        """
        slots = asyncio.Semaphore(self._concurrency)
        uploads: list[asyncio.Task[str]] = []
        whole = _md5()
        source = await asyncio.to_thread(path.open, "rb")
        try:
            async with asyncio.TaskGroup() as group:
                for number in itertools.count(1):
                    await slots.acquire()  # taken before reading: bounds the parts in memory
                    chunk, digest = await asyncio.to_thread(_read_part, source, part_size, whole)
                    if not chunk:
                        slots.release()
                        break
                    upload = group.create_task(
                        self._upload_part(what, target, number, chunk, digest)
                    )
                    upload.add_done_callback(lambda _: slots.release())
                    uploads.append(upload)
        except BaseExceptionGroup as failures:
            raise _first_error(failures)  # noqa: B904 - the leaf keeps its own cause
        finally:
            await asyncio.to_thread(source.close)
        parts = [{"PartNumber": n, "ETag": u.result()} for n, u in enumerate(uploads, start=1)]
        return parts, whole.hexdigest()

    async def _upload_part(
        self, what: str, target: dict[str, Any], number: int, chunk: bytes, md5: str
    ) -> str:
        """Upload one part; its ETag."""
        response = await self._call(
            f"{what}, part {number}",
            "upload_part",
            **target,
            PartNumber=number,
            Body=chunk,
            ContentMD5=md5,
        )
        self._stats.bytes_uploaded += len(chunk)
        return str(response["ETag"])

    async def _complete(
        self,
        what: str,
        target: dict[str, Any],
        parts: list[dict[str, Any]],
        etags: set[str],
        *,
        create_only: bool = False,
    ) -> None:
        """CompleteMultipartUpload (`If-None-Match: *` with `create_only`).

        `NoSuchUpload` after a lost response and a retry means the first try may have worked:
        then the object's ETag is one of `etags` (multipart-style or whole-file MD5).  So does
        a create-only conflict over an object holding our bytes.
        """
        params = dict(target, MultipartUpload={"Parts": parts})
        if create_only and self._conditional_writes:
            params["IfNoneMatch"] = "*"
        try:
            await self._call(what, "complete_multipart_upload", **params)
        except ReplicaUnavailableError as error:
            if _s3_code(error) != "NoSuchUpload" or not await self._holds(target["Key"], etags):
                raise
        except ObjectExistsError:
            if not await self._holds(target["Key"], etags):
                raise

    async def _abort_upload(self, what: str, target: dict[str, Any]) -> None:
        """Best effort: an upload left behind costs storage until a lifecycle rule expires it."""
        try:
            await self._call(what, "abort_multipart_upload", **target)
        except ReplicaError as exc:
            _log.warning("multipart_abort_failed", replica=self.url, upload=what, error=str(exc))

    # -- the boundary: every request goes through here -----------------------------------------

    async def _call(self, what: str, method: str, **params: Any) -> dict[str, Any]:
        """Call one botocore operation, translating every failure into the replicad tree."""
        client = await self._ready()
        try:
            response = await getattr(client, method)(**params)
        except ParamValidationError:
            raise  # our bug, not the replica's: keep the traceback
        except (ClientError, *_TRANSIENT_ERRORS) as exc:
            raise self._translate(exc, what) from exc
        return cast(dict[str, Any], response)

    def _translate(self, exc: BaseException, what: str) -> ReplicaError:
        """The replicad error for a botocore/aiohttp failure, marked with its operation."""
        error = self._translate_unmarked(exc, what)
        error.operation = what.split(" ", 1)[0]
        return error

    def _translate_unmarked(self, exc: BaseException, what: str) -> ReplicaError:
        if isinstance(exc, ClientError):
            return self._classify(
                what,
                exc.response.get("Error", {}).get("Code", ""),
                exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0),
                exc.response.get("Error", {}).get("Message", ""),
            )
        if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
            return ReplicaAccessError(
                f"S3 {what} in {self._where}: no usable credentials",
                hint="set access_key_id and secret_access_key, AWS_* variables, or a profile",
            )
        if isinstance(exc, SSLError):
            return ReplicaAccessError(
                f"S3 {what} in {self._where}: TLS failed: {exc}",
                hint="check the endpoint URL, ca_bundle and verify_tls",
            )
        return ReplicaUnavailableError(
            f"S3 {what} in {self._where} failed: {type(exc).__name__}: {exc}",
            hint="check that the endpoint is reachable",
        )

    def _classify(self, what: str, code: str, status: int, message: str) -> ReplicaError:
        """Map an S3 error code and HTTP status to the replicad tree."""
        failed = f"S3 {what} in {self._where} failed: {code or status}"
        if message and message != code:
            failed += f": {message}"
        if code == "PreconditionFailed" or status == 412:
            return ObjectExistsError(failed, hint="another writer is using this replica prefix")
        if code in _BUCKET_CODES:
            return ReplicaAccessError(failed, hint="check the bucket name, endpoint and region")
        if code == "NoSuchUpload":
            return ReplicaUnavailableError(
                failed, hint="the multipart upload was aborted or expired"
            )
        if code in _NOT_FOUND_CODES or status == 404:
            return ObjectNotFoundError(failed)
        if code == "RequestTimeTooSkewed":
            return ReplicaAccessError(failed, hint="this machine's clock is wrong; sync it")
        if code in _CREDENTIAL_CODES or status == 401:
            return ReplicaAccessError(
                failed, hint="check the access key ID, secret access key and session token"
            )
        if code in _ACCESS_CODES or status == 403:
            return ReplicaAccessError(
                failed,
                hint="check the credentials, bucket name and endpoint, and that the key may "
                "list, read, write and delete under the prefix",
            )
        if code in _TRANSIENT_CODES or status in (408, 429) or (status >= 500 and status != 501):
            return ReplicaUnavailableError(failed, hint="the server is failing or overloaded")
        return ReplicaAccessError(
            failed, hint="the server refused the request; check it is S3-compatible"
        )

    async def _ready(self) -> Any:
        """The open botocore client (opening it on first use)."""
        self._check_not_closed()
        if self._client is None:
            await self.open()
        # The shared client's hook counts this request (and its retries) as ours.
        _CURRENT_STATS.set(self._stats)
        return self._client

    def _check_not_closed(self) -> None:
        if self._closed:
            raise RuntimeError(f"replica client for {self.url} is closed")

    def _put_params(self, full_key: str) -> dict[str, Any]:
        """Parameters every object write carries."""
        params = {"Bucket": self._bucket, "Key": full_key}
        if self._storage_class:
            params["StorageClass"] = self._storage_class
        return params


class _SharedClient:
    """One botocore client (and connection pool) and how many replica clients use it.

    Its pool bounds the requests in flight across every database using it, and aiohttp's
    connector hands freed connections to waiters in arrival order: a busy database queues
    behind the others' uploads rather than starving them.
    """

    def __init__(self, client_and_stack: tuple[Any, AsyncExitStack]) -> None:
        self.client, self.stack = client_and_stack
        self.users = 0


#: Per event loop (a client belongs to the loop that opened it): settings -> shared client.
_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], _SharedClient]]
_SHARED = weakref.WeakKeyDictionary()
#: The stats of the replica client whose request is being sent (set by `_ready`).
_CURRENT_STATS: contextvars.ContextVar[ClientStats | None] = contextvars.ContextVar(
    "replicad_s3_stats", default=None
)


def _count_attempt(event_name: str, **_: Any) -> None:
    """`before-send` hook: one call per HTTP attempt, retries included, counted for the
    replica client that made the request.
    """
    stats = _CURRENT_STATS.get()
    if stats is not None:
        operation = event_name.rsplit(".", 1)[-1]
        stats.count(_OPERATIONS.get(operation, operation.upper()))


@functools.cache
def _shared_data_loader() -> Any:
    """One botocore data loader for the process, so service models are parsed only once.

    Every new session otherwise re-reads and parses the S3 model (megabytes of JSON), which
    blocks the event loop for 0.1-0.2 s per replica; the models never change while we run.
    """
    return AioSession().get_component("data_loader")


def _botocore_config(
    *,
    path_style: bool,
    connect_timeout: float,
    read_timeout: float,
    max_attempts: int,
    sign_payload: bool | None,
    pool_size: int,
) -> Any:
    """The explicit botocore `Config`; see the module docstring for why each setting."""
    s3: dict[str, Any] = {"addressing_style": "path" if path_style else "virtual"}
    if sign_payload is not None:
        s3["payload_signing_enabled"] = sign_payload
    return Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # `total_max_attempts` counts the first try; botocore's `max_attempts` counts retries.
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        s3=s3,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=pool_size,
        user_agent_appid="replicad",
    )


def _md5(data: bytes = b"") -> Any:
    """An MD5 hash object; an integrity check, not security, so allowed on FIPS systems too."""
    return hashlib.md5(data, usedforsecurity=False)


def _b64(digest: Any) -> str:
    """A hashlib digest as the base64 text `Content-MD5` wants."""
    return base64.b64encode(digest.digest()).decode("ascii")


def _read_part(source: IO[bytes], size: int, whole: Any) -> tuple[bytes, str]:
    """Read the next part (in a worker thread): its bytes and Content-MD5; feed `whole`."""
    chunk = source.read(size)
    whole.update(chunk)
    return chunk, _b64(_md5(chunk))


def _multipart_etag(parts: list[dict[str, Any]]) -> str:
    """The ETag S3 gives a completed multipart upload: MD5 of the parts' MD5s, dash, count."""
    digests = b"".join(bytes.fromhex(str(part["ETag"]).strip('"')) for part in parts)
    return f"{_md5(digests).hexdigest()}-{len(parts)}"


def _s3_code(error: ReplicaError) -> str:
    """The S3 error code behind a translated error, or ""."""
    cause = error.__cause__
    return (
        str(cause.response.get("Error", {}).get("Code", ""))
        if isinstance(cause, ClientError)
        else ""
    )


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf of an exception group, preferring a replicad error over cancellation."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return next((e for e in leaves if isinstance(e, ReplicaError)), leaves[0])


def _strip_userinfo(url: str) -> str:
    """`url` without any `user:password@` part."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host, query="", fragment="").geturl()


def _display_endpoint(endpoint_url: str | None, region: str | None) -> str:
    """The endpoint as messages show it."""
    if endpoint_url:
        return _strip_userinfo(endpoint_url)
    return f"AWS S3 ({region or 'default region'})"
