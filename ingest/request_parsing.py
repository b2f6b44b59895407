"""Checks and parsing of ingest requests: frame fields, bodies and multipart batches.

A failed check raises ``IngestError``, which carries the HTTP status and the
JSON body of the rejection.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from pipeline.errors import FaultlineError
from pipeline.kafka import MESSAGE_OVERHEAD_BYTES
from schemas.records import CONTENT_TYPES

API_PREFIX = "/v1/lines/{line}"
CAMERA_ID_MAX_LENGTH = 64
FRAME_ID_MAX_LENGTH = 128
# Ids become Kafka keys and header values, and a consumer may use them in file
# names, so they are restricted to characters that cannot form a path.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Capture times before 2000-01-01 are rejected, because such values are
# almost always seconds or milliseconds.
MIN_CAPTURED_AT_NS = 946_684_800 * 1_000_000_000
MAX_CAPTURED_AT_NS = 2**63 - 1
MAX_BATCH_PART_HEADERS = 16


class IngestError(FaultlineError):
    """A request or one frame of it is rejected with an HTTP status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        value: Any = None,
        limit: Any = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.value = value
        self.limit = limit
        self.retry_after_s = retry_after_s

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "error": self.code,
            "status": self.status,
            "message": self.message,
            "value": self.value,
            "limit": self.limit,
        }
        if self.retry_after_s is not None:
            body["retry_after_s"] = self.retry_after_s
        return body

    @property
    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return headers


# Frame fields: ids, capture time and content type


@dataclass(frozen=True)
class FrameFields:
    """Client-supplied fields of one frame, besides its bytes."""

    camera_id: str
    content_type: str
    captured_at_ns: int | None = None
    frame_id: str | None = None


def validate_id(kind: str, value: Any, max_length: int) -> str:
    """Return ``value`` unchanged, or raise a 422 IngestError naming the rule."""
    if not isinstance(value, str) or not value:
        raise IngestError(
            422, "invalid-header", f"{kind} is missing or empty", value=value
        )
    if len(value) > max_length:
        raise IngestError(
            422,
            "invalid-header",
            f"{kind} has {len(value)} characters; the maximum is {max_length}",
            value=value[:80],
            limit=max_length,
        )
    if not _ID_PATTERN.match(value) or ".." in value:
        raise IngestError(
            422,
            "invalid-header",
            f"{kind} {value!r} is invalid: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit and without '..'",
            value=value,
        )
    return value


def parse_captured_at(value: Any, name: str) -> int:
    """Return a capture time in epoch nanoseconds from an integer or RFC 3339 text."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if value < MIN_CAPTURED_AT_NS or value > MAX_CAPTURED_AT_NS:
            raise IngestError(
                422,
                "invalid-header",
                f"{name}={value} is out of range: send epoch nanoseconds "
                "(not seconds or milliseconds) after 2000-01-01, or RFC 3339 text",
                value=value,
                limit=[MIN_CAPTURED_AT_NS, MAX_CAPTURED_AT_NS],
            )
        return value
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return parse_captured_at(int(moment.timestamp() * 1_000_000) * 1000, name)
    raise IngestError(
        422,
        "invalid-header",
        f"{name}={value!r} is invalid: send epoch nanoseconds or RFC 3339 text "
        "with a time zone, for example 2025-01-31T08:00:00.123Z",
        value=value,
    )


def media_type(content_type: Any) -> str:
    if not isinstance(content_type, str):
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def validate_content_type(content_type: Any) -> str:
    declared = media_type(content_type)
    if declared not in CONTENT_TYPES:
        raise IngestError(
            415,
            "unsupported-media-type",
            f"content type {declared or '(none)'!r} is not supported; send one of "
            f"{', '.join(CONTENT_TYPES)}",
            value=declared or None,
            limit=list(CONTENT_TYPES),
        )
    return declared


def pick_field(
    header_name: str, header_value: str | None, query_name: str, query_value: str | None
) -> str | None:
    """Return the field from the header or the query, which must agree if both exist."""
    if (
        header_value is not None
        and query_value is not None
        and header_value != query_value
    ):
        raise IngestError(
            422,
            "invalid-header",
            f"header {header_name}={header_value!r} and query parameter "
            f"{query_name}={query_value!r} differ; send one of them",
            value=[header_value, query_value],
        )
    return header_value if header_value is not None else query_value


def frame_fields(
    content_type: str | None,
    camera_id: str | None,
    captured_at: str | None,
    frame_id: str | None,
    *,
    names: tuple[str, str, str] = ("camera id", "captured-at", "frame id"),
) -> FrameFields:
    """Validate the fields of one frame, raising IngestError 415 or 422."""
    camera_name, captured_name, frame_name = names
    declared = validate_content_type(content_type)
    camera = validate_id(camera_name, camera_id, CAMERA_ID_MAX_LENGTH)
    captured_at_ns = None
    if captured_at is not None and captured_at != "":
        captured_at_ns = parse_captured_at(captured_at, captured_name)
    frame = None
    if frame_id is not None and frame_id != "":
        frame = validate_id(frame_name, frame_id, FRAME_ID_MAX_LENGTH)
    return FrameFields(camera, declared, captured_at_ns, frame)


# Request bodies


def too_large(
    size: int, limit: int, what: str, hint: str, code: str = "frame-too-large"
) -> IngestError:
    return IngestError(
        413,
        code,
        f"{what} is {size} bytes; the limit is {limit} bytes {hint}",
        value=size,
        limit=limit,
    )


FRAME_LIMIT_HINT = (
    f"(FAULTLINE_MAX_MESSAGE_BYTES: the frames topic's max.message.bytes less "
    f"{MESSAGE_OVERHEAD_BYTES} bytes for headers)"
)


async def read_body(
    request: Request, limit: int, what: str, hint: str, code: str = "frame-too-large"
) -> bytes:
    """Read the request body, raising 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit, what, hint, code)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(len(body), limit, f"{what} (read so far)", hint, code)
    return bytes(body)


@dataclass
class BatchPart:
    """One multipart part. ``size`` also counts the bytes beyond the kept ``data``."""

    index: int
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    size: int = 0


def multipart_boundary(content_type: str | None) -> bytes:
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise IngestError(
            415,
            "unsupported-media-type",
            f"batch content type {media_type(content_type) or '(none)'!r} is not "
            "supported; send multipart/form-data with a boundary, one image per part",
            value=media_type(content_type) or None,
            limit=["multipart/form-data"],
        )
    return boundary


async def iter_batch_parts(
    request: Request, boundary: bytes, max_part_bytes: int
) -> AsyncIterator[BatchPart]:
    """Yield the parts of a multipart body as each one ends, streaming the body.

    A part keeps at most ``max_part_bytes`` of data, so memory stays bounded
    by one frame however large the request is.
    """
    finished: deque[BatchPart] = deque()
    current = BatchPart(index=-1)
    header_name = bytearray()
    header_value = bytearray()
    count = 0

    def on_part_begin() -> None:
        nonlocal current, count
        current = BatchPart(index=count)
        count += 1

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        name = header_name.decode("latin-1").strip().lower()
        current.headers[name] = header_value.decode("latin-1").strip()
        header_name.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.size += end - start
        if current.size <= max_part_bytes:
            current.data.extend(data[start:end])

    def on_part_end() -> None:
        finished.append(current)

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
        max_header_count=MAX_BATCH_PART_HEADERS,
    )
    async for chunk in request.stream():
        parser.write(chunk)
        while finished:
            yield finished.popleft()
    parser.finalize()
    while finished:
        yield finished.popleft()
