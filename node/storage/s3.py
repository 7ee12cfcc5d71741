"""S3 storage driver (AWS S3, MinIO, Ceph RGW ...): boto3, its blocking calls on a bounded thread pool.

Committed objects are plain S3 objects under `rootdirectory`. Uploads are where S3 differs from a
file: clients send chunks of any size over many requests, possibly to different nodes, while S3
multipart parts must be at least 5 MiB (except the last) and number at most 10,000. So a chunked
upload is kept as

- an S3 multipart upload begun at the upload key (created when the first full part is ready), whose
  completed parts are all exactly `part_size(partsize, n)` bytes, and
- a "tail": the bytes after the last part, fewer than a part, kept as small "segment" objects of
  their own beside the upload key (`<upload key>.tail-<token>`). Each request that leaves bytes
  short of a part writes them as one new segment under a new random token: it never rewrites,
  re-reads or deletes the segments of the state it started from, because until the node records
  the new state in the coordinator the old state is the one a retry continues from. A request that
  completes a part takes the segments' bytes from this process's cache of the segments it wrote
  (or, when the upload moved between nodes, reads them back once) and uploads them with its own
  bytes as the part. So a client sending 1 MiB chunks costs about one segment PUT per chunk and
  one part upload per part, whatever the node each chunk lands on, and no tail is rewritten per
  chunk. More than MAX_SEGMENTS segments (tiny chunks) are merged into one.

Everything needed to continue is in the JSON UploadState that the coordinator keeps in the upload
session, so any node may take the next request:

    {"v": 2,
     "partsize": 10485760,             # base part size, fixed when the upload began
     "upload": "<UploadId>" | None,    # the S3 multipart upload at the upload key
     "parts": [[1, "<etag>", 10485760], ...],   # completed parts: number, ETag, size
     "segments": [["<token>", 123], ...],       # the tail in order: <upload key>.tail-<token>, and
                                                # the bytes of it that belong to the upload (a prefix)
     "tailsize": 123,                  # the segments' bytes together
     "stale": ["<token>", ...]}        # segments that this state superseded

(A version 1 state, from an earlier Wharf, names one tail object as "tail" and "tailsize": it is
read as one segment.)

A request starts from the session's recorded state, so the segments in its `stale` list are
referenced by nothing and are deleted then. Segments and parts written by a request whose new
state was never recorded are harmless: their tokens are never reused, a part is overwritten when
the next request uploads the same part number, and the commit names each part with its recorded
ETag (S3 refuses a part whose ETag differs, so a late write from an abandoned request cannot slip
into a blob). Commit and abort remove every segment by listing `<upload key>.tail-`. The cache
holds only bytes already stored under a token that is never reused, so a miss or another node's
cache can never change what an upload holds. It keeps at most two base parts' worth per process (20
MiB with the default; least recently used go first): enough for a few chunked uploads at a time, and
past that a part's segments are read back, which costs a GET, never a wrong byte.

Committing: an upload smaller than one part is PUT at the blob's content-addressed key. A
multipart upload is completed where it began, at the upload key, and that key is returned for the
blob record: copying it to the blob key would be a server-side copy of every byte, and S3's
copy-source limit of 5 GiB is where Distribution's driver broke. So a committed blob may live at
`.../_uploads/<id>/data`; `upload_abort` therefore never deletes the upload key itself, only the
multipart upload and the tails. A multipart upload begun by a request whose state was never
recorded is left behind: give the bucket a lifecycle rule that aborts incomplete multipart uploads
after a few days (AWS bills their parts until then).

Part sizes: part n is `partsize * 2 ** ((n - 1) // 1000)` (capped at 5 GiB): 1000 parts of the base
size, then 1000 of twice it, and so on. A part is therefore never more than 1/500 of the bytes
uploaded before it, and 10,000 parts reach ~4.9 TiB with the 5 MiB minimum (~9.8 TiB with
the default 10 MiB; S3 objects end at 5 TiB). Memory per request is about two parts (one being
received, one in flight to S3): 20 MiB with the default until an upload passes ~9.8 GiB.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from botocore.loaders import JSONFileLoader, Loader

from .driver import StoredObject, UploadInterrupted, UploadState

if TYPE_CHECKING:
    from ..config import S3Storage

log = logging.getLogger("wharf.storage.s3")

T = TypeVar("T")

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
# Part sizes double after every this many parts (see the module docstring).
PARTS_PER_STEP = 1000
_READ_CHUNK = 1 * MiB
# Presigned GET URLs handed to clients in blob redirects.
REDIRECT_EXPIRY_SECONDS = 20 * 60
_STATE_VERSION = 2
# More segments than this in one tail are merged into one (chunks of a few KiB would otherwise make
# thousands of objects per part and a session record that grows with them).
MAX_SEGMENTS = 32
# Segment bytes this process keeps after writing them, in base parts: a part's worth for each of a
# few uploads at a time, so the request that completes a part need not read them back.
_CACHED_PARTS = 2
_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_NO_UPLOAD = frozenset({"NoSuchUpload", "404"})


# Aliases: inside S3Driver, `list` is the method.
_Keys = list[str]
_Parts = list[tuple[int, str, int]]
_Listed = list[tuple[str, int, float]]
_Segments = list[tuple[str, int]]
_Pieces = list[bytes]


def part_size(base: int, number: int, parts_per_step: int = PARTS_PER_STEP) -> int:
    """Size of multipart part `number` (1-based) for an upload with base part size `base`."""
    return min(base << ((number - 1) // parts_per_step), MAX_PART_SIZE)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _forget(future: asyncio.Future[Any]) -> None:
    """Let a future we no longer wait for finish without a "never retrieved" warning."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


async def _none() -> None:
    return None


def _tail_key(upload_key: str, token: str) -> str:
    return f"{upload_key}.tail-{token}"


@dataclass
class _Upload:
    """The parsed UploadState."""

    partsize: int
    upload: str | None = None
    parts: list[tuple[int, str, int]] = field(default_factory=list)
    segments: list[tuple[str, int]] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, state: UploadState, default_partsize: int) -> _Upload:
        if "segments" in state:
            segments = [(str(token), int(size)) for token, size in state["segments"]]
        elif state.get("tail") and int(state.get("tailsize", 0)):
            segments = [(str(state["tail"]), int(state["tailsize"]))]  # version 1: one tail object
        else:
            segments = []
        return cls(
            partsize=int(state.get("partsize") or default_partsize),
            upload=state.get("upload"),
            parts=[(int(n), str(etag), int(size)) for n, etag, size in state.get("parts", [])],
            segments=segments,
            stale=[str(t) for t in state.get("stale", [])],
        )

    def dump(self) -> UploadState:
        return {
            "v": _STATE_VERSION,
            "partsize": self.partsize,
            "upload": self.upload,
            "parts": [[n, etag, size] for n, etag, size in self.parts],
            "segments": [[token, size] for token, size in self.segments],
            "tailsize": self.tailsize,
            "stale": list(self.stale),
        }

    @property
    def parts_bytes(self) -> int:
        return sum(size for _, _, size in self.parts)

    @property
    def tailsize(self) -> int:
        return sum(size for _, size in self.segments)

    @property
    def size(self) -> int:
        return self.parts_bytes + self.tailsize


def _truncated(segments: list[tuple[str, int]], keep: int) -> tuple[list[tuple[str, int]], list[str]]:
    """The segments holding the first `keep` bytes of a tail, and the tokens of those left out."""
    kept: list[tuple[str, int]] = []
    for token, size in segments:
        if keep <= 0:
            break
        kept.append((token, min(size, keep)))
        keep -= size
    return kept, [token for token, _ in segments[len(kept) :]]


class _SegmentCache:
    """Segment bytes this process wrote, by full key, within a byte budget (least recently used go)."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._used = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str, size: int) -> bytes | None:
        data = self._items.get(key)
        if data is None or len(data) < size:
            return None
        self._items.move_to_end(key)
        return data[:size] if len(data) > size else data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self._budget:
            return
        self.drop(key)
        self._items[key] = data
        self._used += len(data)
        while self._used > self._budget:
            _, old = self._items.popitem(last=False)
            self._used -= len(old)

    def drop(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._used -= len(old)

    def drop_upload(self, full_upload_key: str) -> None:
        prefix = f"{full_upload_key}.tail-"
        for key in [k for k in self._items if k.startswith(prefix)]:
            self.drop(key)


# The services whose entries of botocore's endpoints file an S3 client (and the credential
# providers it may call: assumed roles, SSO) look up; see _S3DataFiles.
_ENDPOINT_SERVICES = frozenset({"s3", "sts", "sso", "sso-oidc"})


class _S3DataFiles(JSONFileLoader):
    """botocore's data files without what an S3 client never reads (issue 13: a node within 100 MiB).

    `endpoints.json` describes every AWS service in every partition, about 7 MiB of Python objects
    once parsed, and botocore keeps it for the client's life; an S3 client looks up a handful of its
    services. The documentation strings of the S3 API model only feed docstrings (the keys stay,
    empty). Together about 8 MiB less in every node.
    """

    def load_file(self, file_path: str) -> Any:
        data = super().load_file(file_path)
        name = os.path.basename(file_path)
        if isinstance(data, dict) and name == "endpoints":
            for partition in data.get("partitions", []):
                services = partition.get("services", {})
                partition["services"] = {k: v for k, v in services.items() if k in _ENDPOINT_SERVICES}
        elif isinstance(data, dict) and name == "service-2":
            _blank_documentation(data)
        return data


def _blank_documentation(node: Any) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("documentation"), str):
            node["documentation"] = ""
        for child in node.values():
            _blank_documentation(child)
    elif isinstance(node, list):
        for child in node:
            _blank_documentation(child)


def _boto3_session() -> boto3.session.Session:
    """A boto3 session reading botocore's data through _S3DataFiles (AWS_DATA_PATH still honoured)."""
    core = botocore.session.Session()
    paths = core.get_config_variable("data_path")
    extra = [path for path in paths.split(os.pathsep) if path] if paths else None
    core.register_component("data_loader", Loader(extra_search_paths=extra, file_loader=_S3DataFiles()))
    return boto3.session.Session(botocore_session=core)


class S3Driver:
    name = "s3"

    def __init__(self, config: S3Storage, *, max_threads: int = 32) -> None:
        if not config.bucket:
            raise ValueError("storage.s3.bucket is required")
        self.bucket = config.bucket
        root = config.rootdirectory.strip("/")
        self._root = f"{root}/" if root else ""
        self._part_base = min(max(int(config.chunksize or 0), MIN_PART_SIZE), MAX_PART_SIZE)
        # Server-side copies, as Distribution's driver does them: one request up to the threshold,
        # else a multipart copy in chunks, several at once.
        self._copy_threshold = min(max(int(config.multipartcopythresholdsize), 0), MAX_PART_SIZE)
        self._copy_chunk = min(max(int(config.multipartcopychunksize), MIN_PART_SIZE), MAX_PART_SIZE)
        self._copy_concurrency = max(1, min(int(config.multipartcopymaxconcurrency), max_threads))
        self._parts_per_step = PARTS_PER_STEP
        self._put_args: dict[str, str] = {}
        if config.encrypt:
            self._put_args["ServerSideEncryption"] = "AES256"
        # STANDARD is what S3 does without the header; some S3-compatible servers refuse the header.
        self._storage_class: dict[str, str] = {}
        if config.storageclass.upper() not in ("", "NONE", "STANDARD"):
            self._storage_class["StorageClass"] = config.storageclass
        endpoint = config.regionendpoint or None
        if endpoint is not None and "://" not in endpoint:
            endpoint = ("https://" if config.secure else "http://") + endpoint
        boto_config = BotoConfig(
            region_name=config.region or "us-east-1",
            signature_version="s3v4" if config.v4auth else "s3",
            max_pool_connections=max_threads,
            retries={"max_attempts": 5, "mode": "standard"},
            s3={"addressing_style": "path" if config.forcepathstyle else "auto"},
            # Checksum headers and aws-chunked bodies only where S3 requires them: several
            # S3-compatible servers (older MinIO, Ceph RGW) refuse them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = _boto3_session()

        def client(url: str | None) -> Any:
            return session.client(
                "s3",
                endpoint_url=url,
                aws_access_key_id=config.accesskey or None,
                aws_secret_access_key=config.secretkey or None,
                use_ssl=config.secure,
                verify=False if config.skipverify else None,
                config=boto_config,
            )

        self._client: Any = client(endpoint)
        # Redirect URLs are signed for the name clients use (signing makes no request): the endpoint
        # the nodes use may be an internal name that no client can or should see.
        public = config.publicendpoint or None
        if public is not None and "://" not in public:
            public = ("https://" if config.secure else "http://") + public
        self._signer: Any = client(public) if public is not None else self._client
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="wharf-s3")
        self._segments = _SegmentCache(_CACHED_PARTS * self._part_base)

    def _key(self, key: str) -> str:
        # Keys come from layout.py out of validated names and digests; refuse anything odd anyway.
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad storage key {key!r}")
        return self._root + key

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- committed objects ------------------------------------------------------------------

    async def stat(self, key: str) -> int | None:
        return await self._run(self._head, self._key(key))

    async def read(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        if length is not None and length <= 0:
            return
        if offset or length is not None:
            last = "" if length is None else str(offset + length - 1)
            byte_range: str | None = f"bytes={offset}-{last}"
        else:
            byte_range = None
        body = await self._run(self._open, self._key(key), byte_range)
        if body is None:
            return
        try:
            while True:
                data: bytes = await self._run(body.read, _READ_CHUNK)
                if not data:
                    break
                yield data
        finally:
            body.close()

    async def read_bytes(self, key: str) -> bytes:
        return await self._run(self._get_bytes, self._key(key), None)

    async def write_bytes(self, key: str, data: bytes) -> None:
        # A PUT is atomic: readers see the old object, or none, or all of the new one.
        await self._run(self._put, self._key(key), data, True)

    async def write_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        # One PUT if the stream ends within a part; else a multipart upload, which S3 shows only
        # once it is completed (and which is aborted if the stream breaks).
        full = self._key(key)
        buf = bytearray()
        size = 0
        upload_id: str | None = None
        parts: _Parts = []
        try:
            async for chunk in chunks:
                buf += chunk
                size += len(chunk)
                while len(buf) >= (part := part_size(self._part_base, len(parts) + 1, self._parts_per_step)):
                    if len(parts) >= MAX_PARTS:
                        raise ValueError(f"object is larger than {MAX_PARTS} S3 multipart parts")
                    if upload_id is None:
                        upload_id = await self._run(self._create_multipart, full)
                    data = bytes(buf[:part])
                    del buf[:part]
                    parts.append(await self._run(self._upload_part, full, upload_id, len(parts) + 1, data))
                    del data
            if upload_id is None:
                await self._run(self._put, full, bytes(buf), True)
                return size
            if buf:
                parts.append(await self._run(self._upload_part, full, upload_id, len(parts) + 1, bytes(buf)))
            await self._run(self._complete_multipart, full, upload_id, parts)
        except BaseException:
            if upload_id is not None:
                try:
                    await self._run(self._abort_multipart, full, upload_id)
                except Exception as exc:
                    log.warning("could not abort the multipart upload of %s: %s", key, exc)
            raise
        return size

    async def delete_many(self, keys: list[str]) -> None:
        if keys:
            await self._run(self._delete_keys, [self._key(key) for key in keys])

    async def modified(self, key: str) -> float | None:
        return await self._run(self._modified, self._key(key))

    def _modified(self, full_key: str) -> float | None:
        response = self._head_object(full_key)
        return None if response is None else float(response["LastModified"].timestamp())

    async def copy(self, source: str, key: str) -> int:
        src, dst = self._key(source), self._key(key)
        size = await self._run(self._head, src)
        if size is None:
            raise FileNotFoundError(f"no object {src!r} in bucket {self.bucket!r}")
        if size <= self._copy_threshold:
            await self._run(
                self._client.copy_object,
                Bucket=self.bucket,
                Key=dst,
                CopySource={"Bucket": self.bucket, "Key": src},
                **self._put_args,
                **self._storage_class,
            )
            return size
        upload_id = await self._run(self._create_multipart, dst)
        try:
            gate = asyncio.Semaphore(self._copy_concurrency)

            async def part(number: int, first: int) -> tuple[int, str, int]:
                last = min(first + self._copy_chunk, size) - 1
                async with gate:
                    response = await self._run(
                        self._client.upload_part_copy,
                        Bucket=self.bucket,
                        Key=dst,
                        UploadId=upload_id,
                        PartNumber=number,
                        CopySource={"Bucket": self.bucket, "Key": src},
                        CopySourceRange=f"bytes={first}-{last}",
                    )
                return number, str(response["CopyPartResult"]["ETag"]), last - first + 1

            starts = range(0, size, self._copy_chunk)
            parts = await asyncio.gather(*(part(n, first) for n, first in enumerate(starts, start=1)))
            await self._run(self._complete_multipart, dst, upload_id, list(parts))
        except BaseException:
            await self._run(self._abort_multipart, dst, upload_id)
            raise
        return size

    async def delete(self, key: str) -> None:
        await self._run(self._client.delete_object, Bucket=self.bucket, Key=self._key(key))

    async def list(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        async for found in self.list_objects(prefix):
            yield found.key

    async def list_objects(self, prefix: str) -> AsyncIterator[StoredObject]:  # type: ignore[override]
        # Like the filesystem driver, a prefix names a directory. One request per 1,000 objects.
        stripped = prefix.strip("/")
        full = self._root + (stripped + "/" if stripped else "")
        token: str | None = None
        while True:
            page, token = await self._run(self._list_page, full, token)
            for key, size, modified in page:
                yield StoredObject(key[len(self._root) :], size, modified)
            if token is None:
                return

    async def redirect_url(self, key: str) -> str | None:
        return await self._run(
            self._signer.generate_presigned_url,
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=REDIRECT_EXPIRY_SECONDS,
        )

    def local_path(self, key: str) -> str | None:
        return None

    # -- uploads ----------------------------------------------------------------------------

    async def upload_start(self, upload_key: str) -> UploadState:
        self._key(upload_key)
        # Nothing in S3 yet: the multipart upload begins with the first full part.
        return _Upload(partsize=self._part_base).dump()

    async def upload_write(
        self, upload_key: str, state: UploadState, offset: int, chunks: AsyncIterator[bytes]
    ) -> tuple[int, UploadState]:
        up = _Upload.load(state, self._part_base)
        key = self._key(upload_key)
        if not up.parts_bytes <= offset <= up.size:
            raise ValueError(
                f"cannot write at offset {offset}: the upload holds {up.size} bytes, "
                f"{up.parts_bytes} of them in completed parts"
            )
        # The state we were given is the recorded one, so the segments it superseded are garbage now.
        cleanup = self._submit(self._delete_quietly, [_tail_key(key, t) for t in up.stale]) if up.stale else None
        for token in up.stale:
            self._segments.drop(_tail_key(key, token))
        # Bytes past `offset` belong to a request that broke before it was recorded: drop them.
        segments, superseded = _truncated(up.segments, offset - up.parts_bytes)
        held = sum(size for _, size in segments)  # tail bytes before `buf`, in the segments
        buf = bytearray()  # this request's bytes not yet in a part
        parts = list(up.parts)
        upload_id = up.upload
        number = len(parts) + 1  # the next part to cut
        pending: asyncio.Future[tuple[int, str, int]] | None = None
        received = 0

        async def settle() -> UploadState:
            """Wait for the part in flight, keep the rest as a new segment, and describe the result."""
            nonlocal pending, segments
            if pending is not None:
                parts.append(await pending)
                pending = None
            if buf:
                segments = [*segments, await self._write_segment(key, bytes(buf))]
                if len(segments) > MAX_SEGMENTS:
                    merged = await self._write_segment(key, await self._load_segments(key, segments))
                    for token, _ in segments:
                        superseded.append(token)
                        self._segments.drop(_tail_key(key, token))
                    segments = [merged]
            return _Upload(up.partsize, upload_id, parts, segments, superseded).dump()

        iterator = chunks.__aiter__()
        try:
            while True:
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                except (asyncio.CancelledError, GeneratorExit):
                    raise
                except Exception as exc:
                    # The stream broke: keep every byte that arrived so the client can resume.
                    # (Storage errors below are not caught: they leave the recorded state as it was.)
                    raise UploadInterrupted(received, await settle(), exc) from exc
                if not chunk:
                    continue
                buf += chunk
                received += len(chunk)
                while held + len(buf) >= (size := part_size(up.partsize, number, self._parts_per_step)):
                    if number > MAX_PARTS:
                        raise ValueError(f"upload is larger than {MAX_PARTS} S3 multipart parts")
                    if pending is not None:
                        # One part in flight to S3 while the next one is received.
                        parts.append(await pending)
                        pending = None
                    if upload_id is None:
                        upload_id = await self._run(self._create_multipart, key)
                    # The tail's segments and this request's bytes, joined once into the part.
                    head: _Pieces = await self._segment_pieces(key, segments) if segments else []
                    for token, _ in segments:
                        # Named by the recorded state until this one is recorded: S3 keeps them,
                        # this process need not.
                        superseded.append(token)
                        self._segments.drop(_tail_key(key, token))
                    segments, held = [], 0
                    need = size - sum(len(piece) for piece in head)
                    with memoryview(buf) as view:
                        data = b"".join((*head, view[:need]))
                    del buf[:need], head
                    pending = self._submit(self._upload_part, key, upload_id, number, data)
                    del data
                    number += 1
            new_state = await settle()
        finally:
            if pending is not None:
                _forget(pending)
            if cleanup is not None:
                _forget(cleanup)
        if cleanup is not None:
            await cleanup
        return received, new_state

    async def _write_segment(self, full_upload_key: str, data: bytes) -> tuple[str, int]:
        token = uuid.uuid4().hex
        segment = _tail_key(full_upload_key, token)
        await self._run(self._put, segment, data, False)
        self._segments.put(segment, data)
        return token, len(data)

    async def _load_segments(self, full_upload_key: str, segments: _Segments) -> bytes:
        """The tail's bytes: from this process's cache where it has them, else read from S3 (at once)."""
        pieces = await self._segment_pieces(full_upload_key, segments)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def _segment_pieces(self, full_upload_key: str, segments: _Segments) -> _Pieces:
        """Each segment's bytes in order, from this process's cache or read from S3 (all at once)."""

        async def one(token: str, size: int) -> bytes:
            segment = _tail_key(full_upload_key, token)
            cached = self._segments.get(segment, size)
            return cached if cached is not None else await self._run(self._get_bytes, segment, size)

        if len(segments) == 1:
            return [await one(*segments[0])]
        return list(await asyncio.gather(*(one(token, size) for token, size in segments)))

    async def upload_commit(self, upload_key: str, state: UploadState, size: int, key: str) -> str:
        up = _Upload.load(state, self._part_base)
        source = self._key(upload_key)
        target = self._key(key)
        if up.size != size:
            raise ValueError(f"upload holds {up.size} bytes, commit asked for {size}")
        # Is the blob stored already: by its digest, or (multipart) by an earlier commit of this state
        # at the upload key? Both looks at once, one round trip.
        stored, completed = await asyncio.gather(
            self._run(self._head, target), self._run(self._head, source) if up.parts else _none()
        )
        if stored is not None:
            # Content-addressed: the same digest already stands for the same bytes.
            await self._tidy(upload_key, state)
            return key
        if not up.parts:
            # Smaller than a part: one PUT at the blob key.
            data = await self._load_segments(source, up.segments)
            await self._run(self._put, target, data, True)
            del data
            await self._tidy(upload_key, state)
            return key
        assert up.upload is not None
        if completed == size:
            # An earlier commit of this state completed, and its node died before removing the
            # tail. Uploading the tail again as a part would fail in each server's own way
            # (NoSuchUpload from AWS and Ceph RGW, a 500 from moto, retried before it surfaces).
            await self._tidy(upload_key, state, multipart=False)
            return upload_key
        parts = list(up.parts)
        if len(parts) + (1 if up.tailsize else 0) > MAX_PARTS:
            raise ValueError(f"upload is larger than {MAX_PARTS} S3 multipart parts")
        try:
            if up.tailsize:
                # The tail is the last part, which may be smaller than 5 MiB.
                data = await self._load_segments(source, up.segments)
                parts.append(await self._run(self._upload_part, source, up.upload, len(parts) + 1, data))
                del data
            await self._run(self._complete_multipart, source, up.upload, parts)
        except (ClientError, FileNotFoundError) as exc:
            # Another commit of the same state may have completed the upload meanwhile; the
            # size check below tells that from a lost upload.
            if isinstance(exc, ClientError) and _error_code(exc) not in _NO_UPLOAD:
                raise
            if await self._run(self._head, source) != size:
                raise
        stored = await self._run(self._head, source)
        if stored != size:
            raise RuntimeError(f"multipart upload {upload_key!r} completed with {stored} bytes, expected {size}")
        await self._tidy(upload_key, state, multipart=False)
        return upload_key

    async def _tidy(self, upload_key: str, state: UploadState, *, multipart: bool = True) -> None:
        """Clean up after a commit that already stored the blob: a failure here must not undo it."""
        try:
            if multipart:
                await self._abort_recorded(upload_key, state)
            else:
                self._segments.drop_upload(self._key(upload_key))
                await self._run(self._delete_tails, self._key(upload_key))
        except Exception as exc:  # left-over tails are small and under the upload's own prefix
            log.warning("cleaning up upload %s after commit failed: %s", upload_key, exc)

    async def upload_abort(self, upload_key: str, state: UploadState) -> None:
        await self._abort_recorded(upload_key, state)
        # A PATCH cut short after it began a multipart upload and before its state was recorded
        # leaves one the state does not name: at this upload's own key, so it is this upload's.
        await self._run(self._abort_unrecorded, self._key(upload_key))

    def _abort_unrecorded(self, full_key: str) -> None:
        listing: dict[str, str] = {"Bucket": self.bucket, "Prefix": full_key}
        try:
            for _ in range(100):  # a few at most: each is a PATCH that died at the moment it began one
                page = self._client.list_multipart_uploads(**listing)
                for item in page.get("Uploads", []):
                    if item.get("Key") == full_key:
                        self._abort_multipart(full_key, str(item["UploadId"]))
                if not page.get("IsTruncated"):
                    return
                listing["KeyMarker"] = str(page.get("NextKeyMarker", ""))
                listing["UploadIdMarker"] = str(page.get("NextUploadIdMarker", ""))
        except ClientError as exc:  # a server that does not list them: a bucket lifecycle rule is the fallback
            log.info("cannot list the multipart uploads under %s: %s", full_key, exc)

    async def _abort_recorded(self, upload_key: str, state: UploadState) -> None:
        # The upload key itself is left alone: once completed, it is a committed blob.
        up = _Upload.load(state, self._part_base)
        source = self._key(upload_key)
        self._segments.drop_upload(source)
        if up.upload is not None:
            await self._run(self._abort_multipart, source, up.upload)
        await self._run(self._delete_tails, source)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        if self._signer is not self._client:
            self._signer.close()

    # -- blocking helpers, run on the driver's thread pool ----------------------------------

    def _head_object(self, full_key: str) -> dict[str, Any] | None:
        """The object's HEAD response, None when there is no such object."""
        try:
            response: dict[str, Any] = self._client.head_object(Bucket=self.bucket, Key=full_key)
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return None
            raise
        return response

    def _head(self, full_key: str) -> int | None:
        response = self._head_object(full_key)
        return None if response is None else int(response["ContentLength"])

    def _open(self, full_key: str, byte_range: str | None) -> Any:
        args: dict[str, str] = {"Bucket": self.bucket, "Key": full_key}
        if byte_range is not None:
            args["Range"] = byte_range
        try:
            return self._client.get_object(**args)["Body"]
        except ClientError as exc:
            code = _error_code(exc)
            if code in _NOT_FOUND:
                raise FileNotFoundError(f"no object {full_key!r} in bucket {self.bucket!r}") from exc
            if code == "InvalidRange":
                return None  # an offset at or past the end: nothing to read
            raise

    def _get_bytes(self, full_key: str, length: int | None) -> bytes:
        body = self._open(full_key, None if length is None else f"bytes=0-{length - 1}")
        if body is None:
            return b""
        try:
            data: bytes = body.read()
        finally:
            body.close()
        if length is not None and len(data) != length:
            raise RuntimeError(f"{full_key!r} holds {len(data)} bytes, expected {length}")
        return data

    def _put(self, full_key: str, data: bytes, committed: bool) -> None:
        extra = {**self._put_args, **(self._storage_class if committed else {})}
        self._client.put_object(
            Bucket=self.bucket, Key=full_key, Body=data, ContentType="application/octet-stream", **extra
        )

    def _list_page(self, full_prefix: str, token: str | None) -> tuple[_Listed, str | None]:
        args: dict[str, str] = {"Bucket": self.bucket, "Prefix": full_prefix}
        if token is not None:
            args["ContinuationToken"] = token
        response = self._client.list_objects_v2(**args)
        page = [
            (item["Key"], int(item["Size"]), float(item["LastModified"].timestamp()))
            for item in response.get("Contents", [])
        ]
        return page, (response.get("NextContinuationToken") if response.get("IsTruncated") else None)

    def _delete_keys(self, full_keys: _Keys) -> None:
        for start in range(0, len(full_keys), 1000):
            batch = full_keys[start : start + 1000]
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            errors = response.get("Errors") or []
            if errors:
                raise RuntimeError(f"S3 refused to delete {len(errors)} objects, first: {errors[0]}")

    def _delete_quietly(self, full_keys: _Keys) -> None:
        try:
            self._delete_keys(full_keys)
        except Exception:
            # Commit and abort remove every tail anyway.
            log.warning("could not delete superseded upload tails", exc_info=True)

    def _delete_tails(self, full_upload_key: str) -> None:
        keys: _Keys = []
        token: str | None = None
        while True:
            page, token = self._list_page(f"{full_upload_key}.tail-", token)
            keys.extend(key for key, _, _ in page)
            if token is None:
                break
        if keys:
            self._delete_keys(keys)

    def _create_multipart(self, full_key: str) -> str:
        response = self._client.create_multipart_upload(
            Bucket=self.bucket,
            Key=full_key,
            ContentType="application/octet-stream",
            **self._put_args,
            **self._storage_class,
        )
        return str(response["UploadId"])

    def _upload_part(self, full_key: str, upload_id: str, number: int, data: bytes) -> tuple[int, str, int]:
        response = self._client.upload_part(
            Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=number, Body=data
        )
        return number, str(response["ETag"]), len(data)

    def _complete_multipart(self, full_key: str, upload_id: str, parts: _Parts) -> None:
        # The answer is not used: Ceph RGW's has an empty ETag. The caller checks the size by HEAD.
        self._client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=full_key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag, _ in parts]},
        )

    def _abort_multipart(self, full_key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
        except ClientError as exc:
            if _error_code(exc) not in _NO_UPLOAD:
                raise
