"""Resumable chunked uploads of frames, kept on disk until they are complete.

A client starts an upload with the frame's size and headers, receives an
upload id chosen here and a chunk size, puts the chunks by index in any order
(concurrently, and again after a failure), and completes the upload. The edge
then assembles the frame, checks it and produces it as one message, so the
worker reads an uploaded frame like any other. The largest upload is the
largest frame, ``max_message_bytes``. Chunks exist for frames larger than one
HTTP request can carry on the client's path, and so that a broken link costs
one chunk, not the whole frame.

Layout under the upload folder::

    <upload id>/meta.json       line, size, chunk size, frame headers
    <upload id>/chunk-000003    one file per chunk received, by index
    <upload id>/completing      exists while a complete request assembles it

Invariants:

- A path is built only from an upload id that matches 32 hex digits and from
  an integer chunk index in range, and it is checked to lie inside the folder.
  Nothing a client sends can name a path outside it.
- A chunk file appears only whole: it is written under a temporary name and
  renamed, so concurrent and retried puts of one index never mix their bytes.
- The modification time of ``meta.json`` is the upload's last activity. An
  upload expires ``ttl_s`` after it, and ``remove_expired`` deletes it.
- The declared sizes of all open uploads never sum above ``max_total_bytes``.
  The check is exact within one process. Replicas that share the folder can
  overshoot it by the uploads they start at the same moment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import FaultlineError

log = logging.getLogger(__name__)

UPLOAD_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
META_NAME = "meta.json"
COMPLETING_NAME = "completing"
CHUNK_PREFIX = "chunk-"
PART_SUFFIX = ".part"


class UploadError(FaultlineError):
    """Error of a chunked upload request. ``code`` names the case."""

    code = "upload-error"

    def __init__(self, message: str, *, value: Any = None, limit: Any = None) -> None:
        super().__init__(message)
        self.value = value
        self.limit = limit


class InvalidUploadId(UploadError):
    code = "invalid-upload-id"


class UploadNotFound(UploadError):
    code = "upload-not-found"


class UploadExpired(UploadError):
    code = "upload-expired"


class UploadTooLarge(UploadError):
    code = "frame-too-large"


class UploadStorageFull(UploadError):
    code = "upload-storage-full"


class InvalidUpload(UploadError):
    code = "invalid-upload"


class InvalidChunk(UploadError):
    code = "invalid-chunk"


class UploadIncomplete(UploadError):
    code = "upload-incomplete"


class UploadBusy(UploadError):
    code = "upload-busy"


class ChecksumMismatch(UploadError):
    code = "checksum-mismatch"


@dataclass(frozen=True)
class UploadMeta:
    """Record of one upload, written by ``start``. ``frame`` contains its headers."""

    upload_id: str
    line: str
    size: int
    chunk_bytes: int
    created_at_ns: int
    frame: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_bytes)  # ceiling division

    def chunk_size(self, index: int) -> int:
        """Return the exact byte count that chunk ``index`` must have."""
        if index < self.chunk_count - 1:
            return self.chunk_bytes
        return self.size - self.chunk_bytes * (self.chunk_count - 1)


@dataclass(frozen=True)
class UploadStatus:
    meta: UploadMeta
    received: list[int]
    missing: list[int]
    expires_at_ns: int

    def to_json(self) -> dict[str, Any]:
        return {
            "upload_id": self.meta.upload_id,
            "line": self.meta.line,
            "size": self.meta.size,
            "chunk_bytes": self.meta.chunk_bytes,
            "chunk_count": self.meta.chunk_count,
            "received": self.received,
            "missing": self.missing,
            "expires_at": self.expires_at_ns,
        }


@dataclass
class UploadTotals:
    open_uploads: int = 0
    reserved_bytes: int = 0
    expired: list[str] = field(default_factory=list)


class UploadStore:
    """Chunked uploads under one folder. Every method is blocking file I/O."""

    def __init__(
        self,
        root: Path,
        *,
        chunk_bytes: int,
        max_upload_bytes: int,
        max_total_bytes: int,
        ttl_s: float,
    ) -> None:
        self.root = root.expanduser().resolve()
        self.chunk_bytes = chunk_bytes
        self.max_upload_bytes = max_upload_bytes
        self.max_total_bytes = max_total_bytes
        self.ttl_s = ttl_s
        # Serialises the size check and the creation of a new upload.
        self._start_lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)

    # Starting

    def start(
        self, line: str, size: int, frame: dict[str, Any], sha256: str = ""
    ) -> UploadStatus:
        """Create an upload of ``size`` bytes for ``line`` and return its status.

        Raises UploadTooLarge above ``max_upload_bytes`` and UploadStorageFull
        when the open uploads would exceed ``max_total_bytes``.
        """
        if size < 1:
            raise InvalidUpload(
                f"upload size {size} is invalid: it must be at least 1 byte", value=size
            )
        if size > self.max_upload_bytes:
            raise UploadTooLarge(
                f"upload of {size} bytes is larger than the largest frame, "
                f"{self.max_upload_bytes} bytes (FAULTLINE_MAX_MESSAGE_BYTES)",
                value=size,
                limit=self.max_upload_bytes,
            )
        with self._start_lock:
            reserved = self.totals().reserved_bytes
            if reserved + size > self.max_total_bytes:
                raise UploadStorageFull(
                    f"open uploads reserve {reserved} bytes; {size} more would pass "
                    f"the limit of {self.max_total_bytes} bytes "
                    "(FAULTLINE_INGEST_UPLOAD_MAX_TOTAL_BYTES). Retry after uploads "
                    "complete or expire",
                    value=reserved + size,
                    limit=self.max_total_bytes,
                )
            meta = UploadMeta(
                upload_id=uuid.uuid4().hex,
                line=line,
                size=size,
                chunk_bytes=self.chunk_bytes,
                created_at_ns=time.time_ns(),
                frame=dict(frame),
                sha256=sha256.lower(),
            )
            folder = self._folder(meta.upload_id)
            folder.mkdir()
            _write_atomically(folder / META_NAME, json.dumps(asdict(meta)).encode())
        log.info(
            "started upload %s for line %s: %d bytes in %d chunks",
            meta.upload_id,
            line,
            size,
            meta.chunk_count,
        )
        return self._status(meta)

    # Chunks and status

    def put_chunk(
        self, line: str, upload_id: str, index: int, data: bytes
    ) -> UploadStatus:
        """Store chunk ``index``, replacing an earlier copy, and return the status."""
        meta = self._load(line, upload_id)
        if not 0 <= index < meta.chunk_count:
            raise InvalidChunk(
                f"chunk index {index} is out of range: upload {upload_id} has "
                f"chunks 0 to {meta.chunk_count - 1}",
                value=index,
                limit=meta.chunk_count - 1,
            )
        expected = meta.chunk_size(index)
        if len(data) != expected:
            raise InvalidChunk(
                f"chunk {index} of upload {upload_id} is {len(data)} bytes; "
                f"it must be exactly {expected} bytes",
                value=len(data),
                limit=expected,
            )
        folder = self._folder(upload_id)
        try:
            _write_atomically(folder / _chunk_name(index), data)
            # The touch marks activity, so an upload in progress does not expire.
            os.utime(folder / META_NAME)
        except FileNotFoundError:
            raise UploadNotFound(
                f"upload {upload_id} was completed or aborted while chunk {index} "
                "was written",
                value=upload_id,
            ) from None
        return self._status(meta)

    def status(self, line: str, upload_id: str) -> UploadStatus:
        return self._status(self._load(line, upload_id))

    # Completing

    def assemble(self, line: str, upload_id: str) -> tuple[UploadMeta, bytes]:
        """Join the chunks of a whole upload and mark it as completing.

        Raises UploadIncomplete naming the missing chunks, UploadBusy while
        another request completes it, and ChecksumMismatch when a SHA-256 was
        declared at start and differs. On success the caller must call
        ``finish`` (the frame was produced) or ``release`` (it was not).
        """
        meta = self._load(line, upload_id)
        status = self._status(meta)
        if status.missing:
            shown = ", ".join(str(i) for i in status.missing[:20])
            more = " ..." if len(status.missing) > 20 else ""
            raise UploadIncomplete(
                f"upload {upload_id} misses {len(status.missing)} of "
                f"{meta.chunk_count} chunks: {shown}{more}",
                value=status.missing,
                limit=meta.chunk_count,
            )
        marker = self._folder(upload_id) / COMPLETING_NAME
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise UploadBusy(
                f"upload {upload_id} is being completed by another request"
            ) from None
        try:
            payload = self._join(meta)
        except BaseException:
            marker.unlink(missing_ok=True)
            raise
        return meta, payload

    def _join(self, meta: UploadMeta) -> bytes:
        folder = self._folder(meta.upload_id)
        buffer = bytearray()
        for index in range(meta.chunk_count):
            buffer += (folder / _chunk_name(index)).read_bytes()
        if len(buffer) != meta.size:
            raise UploadIncomplete(
                f"upload {meta.upload_id} assembled to {len(buffer)} bytes; "
                f"expected {meta.size}. Put the chunks again",
                value=len(buffer),
                limit=meta.size,
            )
        if meta.sha256:
            digest = hashlib.sha256(buffer).hexdigest()
            if digest != meta.sha256:
                raise ChecksumMismatch(
                    f"upload {meta.upload_id} has SHA-256 {digest}, but start "
                    f"declared {meta.sha256}. Put the chunks again",
                    value=digest,
                    limit=meta.sha256,
                )
        return bytes(buffer)

    def release(self, upload_id: str) -> None:
        """Remove the completing mark after a failed produce, so complete can retry."""
        (self._folder(upload_id) / COMPLETING_NAME).unlink(missing_ok=True)

    def finish(self, upload_id: str) -> None:
        """Delete an upload whose frame the broker acknowledged."""
        shutil.rmtree(self._folder(upload_id), ignore_errors=True)
        log.info("finished upload %s", upload_id)

    def abort(self, line: str, upload_id: str) -> None:
        self._load(line, upload_id, allow_expired=True)
        shutil.rmtree(self._folder(upload_id), ignore_errors=True)
        log.info("aborted upload %s", upload_id)

    # Expiry and totals

    def totals(self, now_ns: int | None = None) -> UploadTotals:
        """Count the open uploads and their declared sizes, listing expired ones."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        totals = UploadTotals()
        for folder in self.root.iterdir():
            meta_path = folder / META_NAME
            try:
                meta = _read_meta(meta_path)
                expires_at = meta_path.stat().st_mtime_ns + int(self.ttl_s * 1e9)
            except (OSError, ValueError, TypeError):
                continue  # being created or deleted by another request
            if expires_at <= now_ns:
                totals.expired.append(folder.name)
            else:
                totals.open_uploads += 1
                totals.reserved_bytes += meta.size
        return totals

    def remove_expired(self, now_ns: int | None = None) -> UploadTotals:
        """Delete expired uploads and stray folders, and return the remaining totals."""
        totals = self.totals(now_ns)
        for name in totals.expired:
            shutil.rmtree(self.root / name, ignore_errors=True)
            log.warning("deleted upload %s: no chunk for %.0f s", name, self.ttl_s)
        for entry in self.root.iterdir():
            # A folder that never received its meta.json is left by a crash.
            stray = not (entry / META_NAME).exists()
            if stray and _age_s(entry) > self.ttl_s:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                log.warning("deleted stray upload entry %s", entry.name)
        return totals

    # Paths

    def _folder(self, upload_id: str) -> Path:
        validate_upload_id(upload_id)
        folder = (self.root / upload_id).resolve()
        if folder.parent != self.root:
            raise InvalidUploadId(
                f"upload id {upload_id!r} is invalid", value=upload_id
            )
        return folder

    def _load(
        self, line: str, upload_id: str, allow_expired: bool = False
    ) -> UploadMeta:
        meta_path = self._folder(upload_id) / META_NAME
        try:
            meta = _read_meta(meta_path)
            mtime_ns = meta_path.stat().st_mtime_ns
        except FileNotFoundError:
            raise UploadNotFound(
                f"upload {upload_id} not found on line {line!r}: it was completed, "
                "aborted or expired, or never started",
                value=upload_id,
            ) from None
        if meta.line != line:
            # Another line's upload reads as unknown, so ids do not leak across lines.
            raise UploadNotFound(
                f"upload {upload_id} not found on line {line!r}", value=upload_id
            )
        expires_at = mtime_ns + int(self.ttl_s * 1e9)
        if not allow_expired and expires_at <= time.time_ns():
            raise UploadExpired(
                f"upload {upload_id} expired: no chunk arrived for {self.ttl_s:g} s "
                "(FAULTLINE_INGEST_UPLOAD_TTL_S). Start a new upload",
                value=upload_id,
                limit=self.ttl_s,
            )
        return meta

    def _status(self, meta: UploadMeta) -> UploadStatus:
        folder = self._folder(meta.upload_id)
        received = []
        missing = []
        for index in range(meta.chunk_count):
            try:
                size = (folder / _chunk_name(index)).stat().st_size
            except FileNotFoundError:
                size = -1
            (received if size == meta.chunk_size(index) else missing).append(index)
        try:
            mtime_ns = (folder / META_NAME).stat().st_mtime_ns
        except FileNotFoundError:
            mtime_ns = meta.created_at_ns
        return UploadStatus(meta, received, missing, mtime_ns + int(self.ttl_s * 1e9))


def validate_upload_id(upload_id: str) -> str:
    """Return ``upload_id`` unchanged, or raise InvalidUploadId."""
    if not isinstance(upload_id, str) or not UPLOAD_ID_PATTERN.match(upload_id):
        shown = upload_id[:80] if isinstance(upload_id, str) else upload_id
        raise InvalidUploadId(
            f"upload id {shown!r} is invalid: upload ids are the 32 hex digits "
            "that starting an upload returned",
            value=shown,
        )
    return upload_id


def _chunk_name(index: int) -> str:
    return f"{CHUNK_PREFIX}{index:06d}"


def _read_meta(path: Path) -> UploadMeta:
    return UploadMeta(**json.loads(path.read_bytes()))


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
