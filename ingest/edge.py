"""The ingest edge: frames over HTTP and WebSocket into ``frames.<line>``.

Routes (all under ``/v1/lines/{line}``, each needing a token with the
``ingest`` role on the line when tokens are configured):

    POST   /frames                          one frame, body = image bytes
    POST   /frames:batch                    multipart, one frame per part
    POST   /uploads                         start a chunked upload
    PUT    /uploads/{upload_id}/chunks/{i}  one chunk, any order, repeatable
    GET    /uploads/{upload_id}             received and missing chunks
    POST   /uploads/{upload_id}:complete    assemble, check and produce
    DELETE /uploads/{upload_id}             abort
    WS     /stream                          binary envelopes, credit-based

plus ``/healthz``, ``/readyz``, ``/metrics`` and the OpenAPI page ``/docs``.

Invariants:

- The edge replies 202 to a frame (or acks it on a WebSocket) only after the
  broker's delivery report, from an idempotent producer with acks=all. The reply's
  partition and offset come from that report.
- The edge keeps a frame's bytes only until the produce call returns, because
  librdkafka copies them into its queue. Chunks of an unfinished upload are
  the exception: they wait on disk (see ``ingest.uploads``).
- The frames of one batch or one WebSocket are produced in the order they
  arrive, keyed by camera id, so one camera's frames keep their order in its
  partition. Frames sent on separate HTTP requests keep their order only
  when the client waits for each reply before the next request.
- While the broker is unreachable the edge replies 503 with Retry-After
  without producing, and ``/readyz`` returns 503.
- Every rejection carries a JSON body ``{error, status, message, value,
  limit}``: ``error`` is a code from a fixed set, ``value`` the offending
  value and ``limit`` the bound or the accepted values.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import uvicorn
from confluent_kafka import KafkaError, KafkaException, Producer
from fastapi import FastAPI, Header, Query, Request, WebSocket
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect

from ingest.metrics import UNKNOWN_LINE, EdgeMetrics
from ingest.uploads import (
    ChecksumMismatch,
    InvalidChunk,
    InvalidUpload,
    InvalidUploadId,
    UploadBusy,
    UploadError,
    UploadExpired,
    UploadIncomplete,
    UploadNotFound,
    UploadStorageFull,
    UploadStore,
    UploadTooLarge,
)
from pipeline.auth import AuthError, TokenStore
from pipeline.errors import ConfigError, FaultlineError
from pipeline.kafka import MESSAGE_OVERHEAD_BYTES, producer_config, topic_max_bytes
from pipeline.settings import Settings
from pipeline.topics import format_position, frames_topic
from schemas.images import check_image
from schemas.records import CONTENT_TYPES, FrameHeaders

log = logging.getLogger(__name__)

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
# A delivery report arrives within delivery.timeout.ms. This margin only
# covers a report that librdkafka never serves.
ACK_GRACE_S = 5.0
# The metadata request that checks the broker waits at most this long.
BROKER_CHECK_TIMEOUT_S = 2.0
# A request for an unknown line refreshes the topic list, at most this often.
MIN_TOPIC_REFRESH_INTERVAL_S = 0.1
PRODUCER_CLOSE_TIMEOUT_S = 10.0
# WebSocket envelope: 4-byte big-endian header length, JSON header, image.
ENVELOPE_LENGTH_BYTES = 4
MAX_ENVELOPE_HEADER_BYTES = 16 * 1024
MAX_BATCH_PART_HEADERS = 16

RAW_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            content_type: {"schema": {"type": "string", "format": "binary"}}
            for content_type in CONTENT_TYPES
        },
    }
}


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


UPLOAD_ERROR_STATUS: dict[type[UploadError], int] = {
    InvalidUploadId: 422,
    InvalidUpload: 422,
    InvalidChunk: 422,
    ChecksumMismatch: 422,
    UploadNotFound: 404,
    UploadExpired: 410,
    UploadTooLarge: 413,
    UploadIncomplete: 409,
    UploadBusy: 409,
    UploadStorageFull: 507,
}


def upload_error(error: UploadError) -> IngestError:
    status = UPLOAD_ERROR_STATUS.get(type(error), 422)
    return IngestError(
        status, error.code, str(error), value=error.value, limit=error.limit
    )


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


# WebSocket envelope


def encode_envelope(header: dict[str, Any], payload: bytes) -> bytes:
    """Build one WebSocket frame message: header length, JSON header, image bytes."""
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return len(encoded).to_bytes(ENVELOPE_LENGTH_BYTES, "big") + encoded + payload


def decode_envelope(message: bytes) -> tuple[dict[str, Any], bytes]:
    """Split a WebSocket frame message, raising a 422 IngestError if it is malformed."""
    if len(message) < ENVELOPE_LENGTH_BYTES:
        raise IngestError(
            422,
            "invalid-envelope",
            f"message of {len(message)} bytes is shorter than the "
            f"{ENVELOPE_LENGTH_BYTES}-byte header length",
            value=len(message),
        )
    length = int.from_bytes(message[:ENVELOPE_LENGTH_BYTES], "big")
    if length > MAX_ENVELOPE_HEADER_BYTES or ENVELOPE_LENGTH_BYTES + length > len(
        message
    ):
        raise IngestError(
            422,
            "invalid-envelope",
            f"header length {length} is invalid for a message of {len(message)} "
            f"bytes (at most {MAX_ENVELOPE_HEADER_BYTES})",
            value=length,
            limit=MAX_ENVELOPE_HEADER_BYTES,
        )
    raw = message[ENVELOPE_LENGTH_BYTES : ENVELOPE_LENGTH_BYTES + length]
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IngestError(
            422,
            "invalid-envelope",
            f"header is not valid JSON: {exc}",
            value=raw[:80].decode("utf-8", "replace"),
        ) from None
    if not isinstance(header, dict):
        raise IngestError(
            422,
            "invalid-envelope",
            "header must be a JSON object",
            value=type(header).__name__,
        )
    return header, message[ENVELOPE_LENGTH_BYTES + length :]


# Producer


class RepeatFilter(logging.Filter):
    """Let one record per key through per interval and count the dropped ones.

    The key is the first ``key_words`` words of the message. Records below
    ``min_level`` always pass.
    """

    def __init__(
        self, interval_s: float, key_words: int = 1, min_level: int = logging.NOTSET
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.key_words = key_words
        self.min_level = min_level
        self._shown_at: dict[str, float] = {}
        self._dropped: Counter[str] = Counter()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        key = " ".join(record.getMessage().split(" ", self.key_words)[: self.key_words])
        now = time.monotonic()
        with self._lock:
            if now - self._shown_at.get(key, -self.interval_s) < self.interval_s:
                self._dropped[key] += 1
                return False
            self._shown_at[key] = now
            dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} similar messages dropped)"
            record.args = None
        return True


# librdkafka logs every failed reconnect, several times a second while the
# broker is down. Its first word is the facility (FAIL, GETPID, ...).
LIBRDKAFKA_LOG = logging.getLogger(f"{__name__}.librdkafka")
LIBRDKAFKA_LOG.addFilter(RepeatFilter(60.0))
PRODUCER_ERROR_LOG = logging.getLogger(f"{__name__}.producer")
PRODUCER_ERROR_LOG.addFilter(RepeatFilter(60.0))
# One warning per status and error code every 10 s. The metrics count them all.
REJECTION_LOG = logging.getLogger(f"{__name__}.rejections")
REJECTION_LOG.addFilter(RepeatFilter(10.0, key_words=2, min_level=logging.WARNING))


class BrokerState(enum.Enum):
    STARTING = "starting"
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"
    FAILED = "failed"  # after a fatal producer error, which needs an edge restart
    CLOSED = "closed"


@dataclass(frozen=True)
class Delivery:
    topic: str
    partition: int
    offset: int
    latency_s: float


class EdgeProducer:
    """The edge's one idempotent producer, bridged to asyncio.

    A thread serves librdkafka's callbacks (``poll``); each delivery report
    resolves its request's future through ``call_soon_threadsafe``. A second
    thread requests metadata every ``ingest_broker_check_interval_s``:
    success marks the broker reachable and refreshes the set of topics, and
    failure marks it unreachable. librdkafka's ``_ALL_BROKERS_DOWN`` error marks
    it unreachable at once, without waiting for the next check.
    """

    def __init__(self, settings: Settings, metrics: EdgeMetrics) -> None:
        if settings.ingest_queue_max_bytes < topic_max_bytes(settings):
            raise ConfigError(
                f"FAULTLINE_INGEST_QUEUE_MAX_BYTES={settings.ingest_queue_max_bytes} "
                f"is below one frame's message of {topic_max_bytes(settings)} bytes "
                "(FAULTLINE_MAX_MESSAGE_BYTES plus overhead): raise it"
            )
        self.settings = settings
        self.metrics = metrics
        self._state = BrokerState.STARTING
        self._state_lock = threading.Lock()
        self._topics: frozenset[str] = frozenset()
        # Start times of the last metadata request, and of the last one that
        # returned: topics created before the latter are in ``_topics``.
        self._refresh_started_at = 0.0
        self._topics_as_of = 0.0
        self._refresh_lock = asyncio.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: Any = None

    @property
    def state(self) -> BrokerState:
        return self._state

    @property
    def reachable(self) -> bool:
        return self._state is BrokerState.REACHABLE

    def config(self) -> dict[str, Any]:
        return producer_config(
            self.settings,
            **{
                "delivery.timeout.ms": int(self.settings.ingest_ack_timeout_s * 1000),
                "queue.buffering.max.messages": self.settings.ingest_queue_max_frames,
                "queue.buffering.max.kbytes": self.settings.ingest_queue_max_bytes
                // 1024,
                # Reconnect within a second of the broker's return.
                "reconnect.backoff.max.ms": 1000,
                "log.connection.close": False,
                "error_cb": self._on_error,
                "logger": LIBRDKAFKA_LOG,
            },
        )

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._producer = Producer(self.config())
        for name, target in (
            ("poll", self._poll_loop),
            ("broker-check", self._check_loop),
        ):
            thread = threading.Thread(target=target, name=f"ingest-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        await asyncio.to_thread(self.refresh_topics)
        log.info(
            "ingest producer started for %s: broker %s",
            self.settings.bootstrap_servers,
            self._state.value,
        )

    async def close(self) -> None:
        if self._producer is None:
            return
        self._stopping.set()
        remaining = await asyncio.to_thread(
            self._producer.flush, PRODUCER_CLOSE_TIMEOUT_S
        )
        if remaining:
            log.warning(
                "closing the ingest producer with %d frames not acknowledged "
                "after %.0f s",
                remaining,
                PRODUCER_CLOSE_TIMEOUT_S,
            )
        for thread in self._threads:
            await asyncio.to_thread(thread.join, BROKER_CHECK_TIMEOUT_S + 1)
        self._set_state(BrokerState.CLOSED, "edge shut down")

    def alive(self) -> bool:
        """Return False after a fatal producer error or when a thread died."""
        threads_alive = all(thread.is_alive() for thread in self._threads)
        return self._state is not BrokerState.FAILED and (
            threads_alive or self._stopping.is_set()
        )

    # Threads

    def _poll_loop(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(0.1)

    def _check_loop(self) -> None:
        interval = self.settings.ingest_broker_check_interval_s
        while not self._stopping.wait(interval):
            self.refresh_topics()

    def refresh_topics(self) -> bool:
        """Request the broker's topic list and return whether the request succeeded."""
        started_at = time.monotonic()
        self._refresh_started_at = started_at
        try:
            metadata = self._producer.list_topics(timeout=BROKER_CHECK_TIMEOUT_S)
        except KafkaException as exc:
            self._set_state(
                BrokerState.UNREACHABLE, f"metadata request failed: {exc.args[0]}"
            )
            return False
        self._topics = frozenset(metadata.topics)
        self._topics_as_of = max(self._topics_as_of, started_at)
        if metadata.brokers:
            self._set_state(BrokerState.REACHABLE, "metadata request succeeded")
        else:
            self._set_state(BrokerState.UNREACHABLE, "metadata lists no broker")
        return True

    def _set_state(self, state: BrokerState, reason: str) -> None:
        with self._state_lock:
            previous = self._state
            if previous is state or previous in (
                BrokerState.FAILED,
                BrokerState.CLOSED,
            ):
                return
            self._state = state
        self.metrics.broker_reachable.set(1 if state is BrokerState.REACHABLE else 0)
        if state is BrokerState.REACHABLE:
            log.info(
                "broker %s is reachable (%s)", self.settings.bootstrap_servers, reason
            )
        elif state is BrokerState.UNREACHABLE:
            log.warning(
                "broker %s is unreachable (%s), so frames get 503 until it is back",
                self.settings.bootstrap_servers,
                reason,
            )

    def _on_error(self, error: Any) -> None:
        if error.fatal():
            log.error("fatal producer error, restart the edge: %s", error)
            self._set_state(BrokerState.UNREACHABLE, str(error))
            with self._state_lock:
                self._state = BrokerState.FAILED
            return
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._set_state(BrokerState.UNREACHABLE, error.str())
            return
        # Connection errors repeat at every reconnect. The filter keeps one a minute.
        PRODUCER_ERROR_LOG.warning("%s: %s", error.name(), error.str())

    # Lines

    def known_line(self, line: str) -> bool:
        """Return whether the cached topic list has the line's frames topic."""
        try:
            return frames_topic(line) in self._topics
        except ConfigError:
            return False

    async def require_line(self, line: str) -> str:
        """Return the line's frames topic, or raise IngestError 404 (or 503)."""
        try:
            topic = frames_topic(line)
        except ConfigError as exc:
            raise IngestError(404, "unknown-line", str(exc), value=line[:80]) from None
        if topic in self._topics:
            return topic
        if not self.reachable:
            # Without the broker the edge cannot tell an unknown line from a new one.
            raise self.unavailable()
        await self._refresh_after(time.monotonic())
        if topic in self._topics:
            return topic
        if not self.reachable:
            raise self.unavailable()
        raise IngestError(
            404,
            "unknown-line",
            f"line {line!r} not found: topic {topic} does not exist. Create it with "
            f"`faultline topics create --line {line}`",
            value=line,
        )

    async def _refresh_after(self, missed_at: float) -> None:
        """Wait for a topic list from a request that started after ``missed_at``."""
        async with self._refresh_lock:
            if self._topics_as_of > missed_at:
                return
            wait_s = (
                self._refresh_started_at
                + MIN_TOPIC_REFRESH_INTERVAL_S
                - time.monotonic()
            )
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await asyncio.to_thread(self.refresh_topics)

    # Producing

    def unavailable(self) -> IngestError:
        return IngestError(
            503,
            "broker-unavailable",
            f"Kafka at {self.settings.bootstrap_servers} is unavailable: the "
            f"edge's broker state is {self._state.value}; retry after "
            f"{self.settings.ingest_retry_after_s} s",
            value=self._state.value,
            retry_after_s=self.settings.ingest_retry_after_s,
        )

    def produce(
        self,
        line: str,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]],
        timestamp_ms: int,
    ) -> asyncio.Future[Delivery | Any]:
        """Hand one frame to librdkafka and return the future of its delivery report.

        Raises IngestError 503 while the broker is unreachable and 429 when
        the producer queue is full.
        """
        loop = self._loop
        if not self.reachable or loop is None:
            raise self.unavailable()
        future: asyncio.Future[Delivery | Any] = loop.create_future()

        def delivered(error: Any, message: Any) -> None:
            try:
                loop.call_soon_threadsafe(_settle, future, error, message)
            except RuntimeError:
                pass  # the loop closed while the edge shut down

        try:
            self._producer.produce(
                frames_topic(line),
                value=value,
                key=key,
                headers=headers,
                timestamp=timestamp_ms,
                on_delivery=delivered,
            )
        except BufferError:
            raise IngestError(
                429,
                "queue-full",
                f"the producer queue is full ({len(self._producer)} frames waiting for "
                "the broker); retry after "
                f"{self.settings.ingest_retry_after_s} s, or raise "
                "FAULTLINE_INGEST_QUEUE_MAX_FRAMES / FAULTLINE_INGEST_QUEUE_MAX_BYTES",
                value=len(self._producer),
                limit=self.settings.ingest_queue_max_frames,
                retry_after_s=self.settings.ingest_retry_after_s,
            ) from None
        except KafkaException as exc:
            raise self.delivery_error(exc.args[0], line, len(value)) from None
        self.metrics.frames_in_flight.labels(line).inc()
        return future

    async def wait(
        self, line: str, future: asyncio.Future[Delivery | Any], size: int
    ) -> Delivery:
        """Wait for the delivery report; raise IngestError if the frame was rejected."""
        try:
            outcome = await asyncio.wait_for(
                future, timeout=self.settings.ingest_ack_timeout_s + ACK_GRACE_S
            )
        except TimeoutError:
            raise IngestError(
                503,
                "broker-unavailable",
                "no delivery report within "
                f"{self.settings.ingest_ack_timeout_s + ACK_GRACE_S:g} s",
                retry_after_s=self.settings.ingest_retry_after_s,
            ) from None
        finally:
            self.metrics.frames_in_flight.labels(line).dec()
        if not isinstance(outcome, Delivery):
            raise self.delivery_error(outcome, line, size)
        self.metrics.produce_seconds.labels(line).observe(outcome.latency_s)
        return outcome

    def delivery_error(self, error: Any, line: str, size: int) -> IngestError:
        """Map a librdkafka error on one frame to the reply's status."""
        code = error.code()
        topic = frames_topic(line)
        retry_after_s = self.settings.ingest_retry_after_s
        if code == KafkaError.MSG_SIZE_TOO_LARGE:
            return IngestError(
                413,
                "frame-too-large",
                f"frame of {size} bytes is too large for {topic}: the topic's "
                "max.message.bytes is below the edge's limit of "
                f"{self.settings.max_message_bytes} bytes. Create line topics "
                "with the edge's FAULTLINE_MAX_MESSAGE_BYTES",
                value=size,
            )
        if code in (
            KafkaError.UNKNOWN_TOPIC_OR_PART,
            KafkaError._UNKNOWN_TOPIC,
            KafkaError._UNKNOWN_PARTITION,
        ):
            return IngestError(
                404,
                "unknown-line",
                f"topic {topic} does not exist: {error.str()}",
                value=line,
            )
        if code == KafkaError.INVALID_TIMESTAMP:
            return IngestError(
                422,
                "invalid-header",
                f"the broker rejected the capture time of the frame for {topic}: it is "
                "outside the topic's log.message.timestamp limits",
                value=error.str(),
            )
        if (
            code == KafkaError._MSG_TIMED_OUT
            or error.retriable()
            or code in _UNAVAILABLE_CODES
        ):
            return IngestError(
                503,
                "broker-unavailable",
                f"the broker did not acknowledge the frame for {topic}: {error.str()}",
                value=error.name(),
                retry_after_s=retry_after_s,
            )
        return IngestError(
            502,
            "broker-error",
            f"the broker rejected the frame for {topic}: {error.str()}",
            value=error.name(),
        )


# Errors that mean "not now" even when librdkafka did not flag them retriable:
# the cluster lacks a leader or in-sync replicas, or did not respond.
_UNAVAILABLE_CODES = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    }
)


def _settle(future: asyncio.Future[Delivery | Any], error: Any, message: Any) -> None:
    """Resolve a produce future on the event loop with a Delivery or a KafkaError."""
    if future.done():
        return  # the request was cancelled: the client went away
    if error is not None:
        future.set_result(error)
        return
    latency = message.latency()
    future.set_result(
        Delivery(message.topic(), message.partition(), message.offset(), latency or 0.0)
    )


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


# The edge


def upload_dir(settings: Settings) -> Path:
    return settings.ingest_upload_dir or settings.home_dir / "uploads"


def ws_max_message_bytes(settings: Settings) -> int:
    """Largest WebSocket message the server reads: a frame plus its envelope."""
    return (
        settings.max_message_bytes + ENVELOPE_LENGTH_BYTES + MAX_ENVELOPE_HEADER_BYTES
    )


class IngestEdge:
    """State of one edge process: producer, tokens, upload store and metrics."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = EdgeMetrics(registry)
        self.tokens = TokenStore.from_settings(settings)
        self.producer = EdgeProducer(settings, self.metrics)
        self.uploads = UploadStore(
            upload_dir(settings),
            chunk_bytes=settings.ingest_upload_chunk_bytes,
            max_upload_bytes=settings.max_message_bytes,
            max_total_bytes=settings.ingest_upload_max_total_bytes,
            ttl_s=settings.ingest_upload_ttl_s,
        )
        self._cleanup_task: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await self.producer.start()
        self._cleanup_task = asyncio.create_task(self._remove_expired_uploads())
        try:
            yield
        finally:
            self._cleanup_task.cancel()
            await self.producer.close()
            log.info("ingest edge stopped")

    async def _remove_expired_uploads(self) -> None:
        interval_s = min(self.settings.ingest_upload_ttl_s / 4, 60.0)
        while True:
            try:
                totals = await asyncio.to_thread(self.uploads.remove_expired)
            except OSError:
                log.exception(
                    "removing expired uploads from %s failed", self.uploads.root
                )
            else:
                self.metrics.uploads_expired.inc(len(totals.expired))
                self.metrics.uploads_open.set(totals.open_uploads)
                self.metrics.uploads_reserved_bytes.set(totals.reserved_bytes)
            await asyncio.sleep(interval_s)

    def authorize(self, authorization: str | None, line: str) -> str:
        """Return the token's name, or raise IngestError 401 or 403."""
        try:
            return self.tokens.check(authorization, "ingest", line)
        except AuthError as exc:
            code = "unauthorized" if exc.status == 401 else "forbidden"
            raise IngestError(exc.status, code, str(exc)) from None

    async def open_line(self, authorization: str | None, line: str) -> None:
        """Check the token, then that the line exists: 401, 403, 404 or 503."""
        self.authorize(authorization, line)
        await self.producer.require_line(line)

    def metric_line(self, line: str) -> str:
        return line if self.producer.known_line(line) else UNKNOWN_LINE

    def reject(self, line: str, error: IngestError) -> None:
        """Count a rejection and log it, as a warning for 5xx statuses."""
        self.metrics.frames_rejected.labels(self.metric_line(line), error.code).inc()
        level = logging.WARNING if error.status >= 500 else logging.DEBUG
        REJECTION_LOG.log(
            level,
            "%d %s on line %s: %s",
            error.status,
            error.code,
            line[:80],
            error.message,
        )

    def require_broker(self) -> None:
        if not self.producer.reachable:
            raise self.producer.unavailable()

    def submit(
        self, line: str, fields: FrameFields, payload: bytes
    ) -> Awaitable[dict[str, Any]]:
        """Check and produce one frame, and return an awaitable of the 202 reply body.

        The checks and the produce call happen now, so frames submitted one
        after another keep their order. Raises IngestError 413, 415, 429 or 503
        before producing. The awaitable raises IngestError when the broker
        rejects the frame.
        """
        limit = self.settings.max_message_bytes
        if len(payload) > limit:
            raise too_large(len(payload), limit, "frame", FRAME_LIMIT_HINT)
        problem = check_image(payload, fields.content_type)
        if problem is not None:
            raise IngestError(
                415,
                "not-an-image",
                problem,
                value=fields.content_type,
                limit=list(CONTENT_TYPES),
            )
        headers = FrameHeaders.new(
            line,
            fields.camera_id,
            fields.content_type,
            captured_at_ns=fields.captured_at_ns,
            frame_id=fields.frame_id,
        )
        future = self.producer.produce(
            line,
            key=fields.camera_id.encode("utf-8"),
            value=payload,
            headers=headers.to_kafka(),
            timestamp_ms=headers.captured_at_ns // 1_000_000,
        )
        return self._acknowledged(line, headers, len(payload), future)

    async def _acknowledged(
        self, line: str, headers: FrameHeaders, size: int, future: asyncio.Future[Any]
    ) -> dict[str, Any]:
        delivery = await self.producer.wait(line, future, size)
        self.metrics.frames_accepted.labels(line).inc()
        self.metrics.bytes_accepted.labels(line).inc(size)
        return {
            "frame_id": headers.frame_id,
            "line": line,
            "camera_id": headers.camera_id,
            "captured_at": headers.captured_at_ns,
            "topic": delivery.topic,
            "partition": delivery.partition,
            "offset": delivery.offset,
            "position": format_position(
                delivery.topic, delivery.partition, delivery.offset
            ),
        }

    async def settle_item(
        self, line: str, index: int, pending: Awaitable[dict[str, Any]]
    ) -> dict[str, Any]:
        """Return one batch item's result: the ack, or the error body."""
        try:
            return {"index": index, "status": 202, **(await pending)}
        except IngestError as error:
            self.reject(line, error)
            return {"index": index, **error.to_json()}

    def batch_item(
        self, line: str, part: BatchPart, camera_id: str | None, captured_at: str | None
    ) -> dict[str, Any] | asyncio.Future[dict[str, Any]]:
        """Check and produce one part; return its error item or its settling task."""
        prefix = f"part {part.index}"
        names = (f"{prefix} Camera-Id", f"{prefix} Captured-At", f"{prefix} Frame-Id")
        limit = self.settings.max_message_bytes
        try:
            if part.size > limit:
                raise too_large(
                    part.size, limit, f"part {part.index}", FRAME_LIMIT_HINT
                )
            fields = frame_fields(
                part.headers.get("content-type"),
                part.headers.get("camera-id", camera_id),
                part.headers.get("captured-at", captured_at),
                part.headers.get("frame-id"),
                names=names,
            )
            pending = self.submit(line, fields, bytes(part.data))
        except IngestError as error:
            self.reject(line, error)
            return {"index": part.index, **error.to_json()}
        return asyncio.ensure_future(self.settle_item(line, part.index, pending))


# WebSocket stream


class FrameStream:
    """One WebSocket client of a line: envelopes in, one ack or error out per frame.

    The first server message grants ``credit`` frames in flight. Every
    message the client sends takes one credit and its ack or error returns
    it, and the server frees the slot before sending the reply. A frame that
    arrives while the client has no credit gets a ``throttle`` message. The
    server then reads nothing more from the socket until a slot frees, which
    slows the client through TCP, and processes the frame after that. While
    the connection is open, no frame is dropped without an ack or an error.
    """

    def __init__(self, edge: IngestEdge, websocket: WebSocket, line: str) -> None:
        self.edge = edge
        self.websocket = websocket
        self.line = line
        self.credit = edge.settings.ingest_ws_credit
        self.slots = asyncio.Semaphore(self.credit)
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.pending: set[asyncio.Task[None]] = set()
        self.received = 0

    async def run(self) -> None:
        self.edge.metrics.ws_connections.labels(self.line).inc()
        sender = asyncio.create_task(self._send_loop())
        self.outbox.put_nowait({"type": "credit", "credit": self.credit})
        try:
            await self._receive_loop()
        finally:
            for task in list(self.pending):
                task.cancel()
            sender.cancel()
            self.edge.metrics.ws_connections.labels(self.line).dec()

    async def _receive_loop(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            index = self.received
            self.received += 1
            header, payload, problem = self._parse(message)
            sequence = header.get("seq", index)
            if self.slots.locked():
                self.edge.metrics.ws_credit_exceeded.labels(self.line).inc()
                self.outbox.put_nowait(
                    {
                        "type": "throttle",
                        "seq": sequence,
                        "in_flight": self.credit,
                        "credit": self.credit,
                        "message": f"frame sent with {self.credit} frames in flight, "
                        "beyond the credit; it waits for a free slot. Wait for "
                        "acks before sending more",
                    }
                )
            await self.slots.acquire()
            if problem is not None:
                self._reply_error(sequence, problem)
                continue
            self._submit(sequence, header, payload)

    def _parse(
        self, message: dict[str, Any]
    ) -> tuple[dict[str, Any], bytes, IngestError | None]:
        data = message.get("bytes")
        if data is None:
            return (
                {},
                b"",
                IngestError(
                    422,
                    "invalid-envelope",
                    "text messages are not frames: send binary messages of a 4-byte "
                    "big-endian header length, a JSON header and the image bytes",
                    value="text",
                ),
            )
        if len(data) > ws_max_message_bytes(self.edge.settings):
            return (
                {},
                b"",
                too_large(
                    len(data),
                    ws_max_message_bytes(self.edge.settings),
                    "message",
                    FRAME_LIMIT_HINT,
                ),
            )
        try:
            header, payload = decode_envelope(data)
        except IngestError as error:
            return {}, b"", error
        sequence = header.get("seq")
        if sequence is not None and not isinstance(sequence, (int, str)):
            return (
                {},
                b"",
                IngestError(
                    422,
                    "invalid-envelope",
                    "seq must be an integer or a string",
                    value=repr(sequence)[:80],
                ),
            )
        return header, payload, None

    def _submit(self, sequence: Any, header: dict[str, Any], payload: bytes) -> None:
        try:
            fields = frame_fields(
                header.get("content_type"),
                header.get("camera_id"),
                header.get("captured_at"),
                header.get("frame_id"),
                names=("camera_id", "captured_at", "frame_id"),
            )
            pending = self.edge.submit(self.line, fields, payload)
        except IngestError as error:
            self._reply_error(sequence, error)
            return
        task = asyncio.create_task(self._acknowledge(sequence, pending))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _acknowledge(
        self, sequence: Any, pending: Awaitable[dict[str, Any]]
    ) -> None:
        try:
            reply = await pending
        except IngestError as error:
            self._reply_error(sequence, error)
            return
        self._reply({"type": "ack", "seq": sequence, **reply})

    def _reply_error(self, sequence: Any, error: IngestError) -> None:
        self.edge.reject(self.line, error)
        self._reply({"type": "error", "seq": sequence, **error.to_json()})

    def _reply(self, body: dict[str, Any]) -> None:
        # The slot frees before the reply leaves, so a client that sends its
        # next frame on receipt of an ack never exceeds its credit.
        self.slots.release()
        self.outbox.put_nowait(body)

    async def _send_loop(self) -> None:
        while True:
            body = await self.outbox.get()
            try:
                await self.websocket.send_text(json.dumps(body, separators=(",", ":")))
            except (WebSocketDisconnect, RuntimeError, OSError) as exc:
                log.debug(
                    "line %s: WebSocket send failed, client gone: %s", self.line, exc
                )
                return


async def deny_websocket(websocket: WebSocket, error: IngestError) -> None:
    """Reject a WebSocket handshake with the HTTP status and JSON body of ``error``."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        response = JSONResponse(
            error.to_json(), status_code=error.status, headers=error.headers
        )
        await websocket.send_denial_response(response)
        return
    # Servers without the denial extension: close codes 4000 + HTTP status.
    reason = error.message.encode("utf-8")[:120].decode("utf-8", "ignore")
    await websocket.close(code=4000 + error.status, reason=reason)


# Application


class UploadStart(BaseModel):
    """Body of the request that starts a chunked upload."""

    size: int
    content_type: str
    camera_id: str
    captured_at: int | str | None = None
    frame_id: str | None = None
    sha256: str | None = None


SHA256_PATTERN = re.compile(r"^[0-9a-fA-F]{64}$")
MAX_START_BODY_BYTES = 16 * 1024

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description}
    for status, description in (
        (401, "missing or invalid bearer token"),
        (403, "the token has no ingest right on this line"),
        (404, "unknown line: its frames topic does not exist"),
        (413, "frame larger than FAULTLINE_MAX_MESSAGE_BYTES"),
        (415, "unsupported content type, or bytes that are not that image type"),
        (422, "invalid camera id, frame id or capture time"),
        (429, "producer queue full; retry after Retry-After"),
        (503, "broker unreachable; retry after Retry-After"),
    )
}


def create_edge(
    settings: Settings | None = None, registry: CollectorRegistry | None = None
) -> FastAPI:
    """Build the ingest edge app, its metrics in ``registry`` (default: a new one)."""
    settings = settings or Settings()
    edge = IngestEdge(
        settings, registry if registry is not None else CollectorRegistry()
    )
    app = FastAPI(
        title="Faultline ingest edge",
        description="Frames over HTTP and WebSocket into frames.<line>, acknowledged "
        "after the broker wrote them.",
        lifespan=edge.lifespan,
    )
    app.state.edge = edge
    _add_error_handlers(app, edge)
    _add_frame_routes(app, edge)
    _add_upload_routes(app, edge)
    _add_stream_route(app, edge)
    _add_probe_routes(app, edge)
    return app


def uvicorn_config(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    registry: CollectorRegistry | None = None,
    **options: Any,
) -> Any:
    """Return a ``uvicorn.Config`` serving the edge, sized for the largest frame.

    ``options`` go to uvicorn unchanged, for example ``ssl_certfile`` and
    ``ssl_keyfile`` for TLS.
    """
    return uvicorn.Config(
        create_edge(settings, registry),
        host=host or settings.ingest_host,
        port=settings.ingest_port if port is None else port,
        ws_max_size=ws_max_message_bytes(settings),
        # Encoded images do not compress, so deflate would only cost CPU.
        ws_per_message_deflate=False,
        **options,
    )


@contextmanager
def running_edge(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    registry: CollectorRegistry | None = None,
    start_timeout_s: float = 30.0,
) -> Iterator[str]:
    """Serve the edge from a thread of this process and yield its base URL.

    Port 0 binds a free port. For tests and for embedding the edge in
    another program; ``faultline ingest`` runs uvicorn in the main thread.
    """
    config = uvicorn_config(
        settings, host=host, port=port, registry=registry, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="ingest-edge", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigError(f"the ingest edge did not start on {host}:{port}")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=PRODUCER_CLOSE_TIMEOUT_S + start_timeout_s)


def _add_error_handlers(app: FastAPI, edge: IngestEdge) -> None:
    async def on_ingest_error(request: Request, exc: IngestError) -> JSONResponse:
        edge.reject(request.path_params.get("line", ""), exc)
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=exc.headers)

    async def on_upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return await on_ingest_error(request, upload_error(exc))

    async def on_validation_error(
        request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        return await on_ingest_error(request, validation_error(exc.errors()))

    async def on_http_error(
        request: Request, exc: StarletteHTTPException
    ) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(
            exc.status_code, "http-error"
        )
        error = IngestError(
            exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}"
        )
        return JSONResponse(
            error.to_json(), status_code=exc.status_code, headers=exc.headers
        )

    # Starlette passes each handler only exceptions of its registered class.
    app.add_exception_handler(IngestError, on_ingest_error)  # type: ignore[arg-type]
    app.add_exception_handler(UploadError, on_upload_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]


def validation_error(problems: Any) -> IngestError:
    """Turn pydantic's error list into one 422 IngestError naming the first problem."""
    problems = list(problems)
    first = problems[0] if problems else {}
    where = ".".join(str(part) for part in first.get("loc", ())) or "request"
    more = f" ({len(problems) - 1} more problems)" if len(problems) > 1 else ""
    try:
        value = jsonable_encoder(first.get("input"))
    except (TypeError, ValueError):
        value = repr(first.get("input"))[:80]
    return IngestError(
        422,
        "invalid-request",
        f"{where}: {first.get('msg', 'invalid')}{more}",
        value=value,
    )


def _add_frame_routes(app: FastAPI, edge: IngestEdge) -> None:
    settings = edge.settings

    @app.post(
        API_PREFIX + "/frames",
        status_code=202,
        summary="Send one frame; the reply carries its topic, partition and offset",
        openapi_extra=RAW_IMAGE_BODY,
        responses=ERROR_RESPONSES,
    )
    async def post_frame(
        request: Request,
        line: str,
        camera_id_header: str | None = Header(
            None, alias="Camera-Id", description="Camera id, the Kafka key."
        ),
        captured_at_header: str | None = Header(
            None,
            alias="Captured-At",
            description="Capture time: epoch ns or RFC 3339. Default: arrival.",
        ),
        frame_id_header: str | None = Header(
            None, alias="Frame-Id", description="Frame id. Default: a new UUID."
        ),
        camera_id: str | None = Query(
            None, description="Camera id, instead of the header."
        ),
        captured_at: str | None = Query(
            None, description="Capture time, instead of the header."
        ),
        frame_id: str | None = Query(
            None, description="Frame id, instead of the header."
        ),
    ) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        fields = frame_fields(
            request.headers.get("content-type"),
            pick_field("Camera-Id", camera_id_header, "camera_id", camera_id),
            pick_field("Captured-At", captured_at_header, "captured_at", captured_at),
            pick_field("Frame-Id", frame_id_header, "frame_id", frame_id),
            names=("Camera-Id", "Captured-At", "Frame-Id"),
        )
        edge.require_broker()
        payload = await read_body(
            request, settings.max_message_bytes, "frame", FRAME_LIMIT_HINT
        )
        pending = edge.submit(line, fields, payload)
        del payload
        return JSONResponse(await pending, status_code=202)

    @app.post(
        API_PREFIX + "/frames:batch",
        status_code=202,
        summary="Send many frames as multipart parts; 207 when some were rejected",
        responses={
            207: {"description": "some items rejected; see each item's status"},
            **ERROR_RESPONSES,
        },
    )
    async def post_batch(
        request: Request,
        line: str,
        camera_id_header: str | None = Header(
            None,
            alias="Camera-Id",
            description="Camera id of parts without their own Camera-Id.",
        ),
        captured_at_header: str | None = Header(
            None,
            alias="Captured-At",
            description="Capture time of parts without their own.",
        ),
        camera_id: str | None = Query(
            None, description="Camera id, instead of the header."
        ),
        captured_at: str | None = Query(
            None, description="Capture time, instead of the header."
        ),
    ) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        boundary = multipart_boundary(request.headers.get("content-type"))
        default_camera = pick_field(
            "Camera-Id", camera_id_header, "camera_id", camera_id
        )
        default_captured = pick_field(
            "Captured-At", captured_at_header, "captured_at", captured_at
        )
        edge.require_broker()
        max_frames = settings.ingest_batch_max_frames
        items: list[dict[str, Any] | asyncio.Future[dict[str, Any]]] = []
        try:
            async for part in iter_batch_parts(
                request, boundary, settings.max_message_bytes
            ):
                if part.index >= max_frames:
                    error = IngestError(
                        413,
                        "batch-too-large",
                        f"batch has more than {max_frames} frames, so part "
                        f"{part.index} "
                        "and later parts were not read; send them in another request "
                        "(FAULTLINE_INGEST_BATCH_MAX_FRAMES)",
                        value=part.index + 1,
                        limit=max_frames,
                    )
                    edge.reject(line, error)
                    items.append({"index": part.index, **error.to_json()})
                    break
                items.append(
                    edge.batch_item(line, part, default_camera, default_captured)
                )
        except MultipartParseError as exc:
            error = IngestError(
                400,
                "invalid-multipart",
                f"multipart body is malformed after {len(items)} parts: {exc}",
                value=len(items),
            )
            if not items:
                raise error from None
            edge.reject(line, error)
            items.append({"index": len(items), **error.to_json()})
        if not items:
            raise IngestError(
                422,
                "invalid-request",
                "batch has no parts: send one image per part",
                value=0,
            )
        results = [item if isinstance(item, dict) else await item for item in items]
        accepted = sum(1 for result in results if result["status"] == 202)
        headers = {}
        if any(result["status"] in (429, 503) for result in results):
            headers["Retry-After"] = str(settings.ingest_retry_after_s)
        return JSONResponse(
            {
                "accepted": accepted,
                "rejected": len(results) - accepted,
                "items": results,
            },
            status_code=202 if accepted == len(results) else 207,
            headers=headers,
        )


def _add_upload_routes(app: FastAPI, edge: IngestEdge) -> None:
    uploads = edge.uploads
    prefix = API_PREFIX + "/uploads"

    @app.post(
        prefix,
        status_code=201,
        summary="Start a chunked upload; the reply names the upload id and chunk size",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": UploadStart.model_json_schema()}
                },
            }
        },
        responses={
            **ERROR_RESPONSES,
            507: {"description": "open uploads reserve the whole budget"},
        },
    )
    async def start_upload(request: Request, line: str) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        raw = await read_body(
            request, MAX_START_BODY_BYTES, "upload start body", "", "invalid-request"
        )
        try:
            start = UploadStart.model_validate_json(raw)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        fields = frame_fields(
            start.content_type,
            start.camera_id,
            None if start.captured_at is None else str(start.captured_at),
            start.frame_id,
            names=("camera_id", "captured_at", "frame_id"),
        )
        if start.sha256 is not None and not SHA256_PATTERN.match(start.sha256):
            raise IngestError(
                422,
                "invalid-request",
                "sha256 must be 64 hex digits",
                value=start.sha256[:80],
            )
        frame = {
            "camera_id": fields.camera_id,
            "content_type": fields.content_type,
            "captured_at_ns": fields.captured_at_ns or time.time_ns(),
            "frame_id": fields.frame_id,
        }
        status = await asyncio.to_thread(
            uploads.start, line, start.size, frame, start.sha256 or ""
        )
        location = f"/v1/lines/{line}/uploads/{status.meta.upload_id}"
        return JSONResponse(
            status.to_json(), status_code=201, headers={"Location": location}
        )

    @app.put(
        prefix + "/{upload_id}/chunks/{index}",
        summary="Put one chunk by index, again to retry",
    )
    async def put_chunk(
        request: Request, line: str, upload_id: str, index: str
    ) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        if not index.isdigit():
            raise IngestError(
                422,
                "invalid-chunk",
                f"chunk index {index[:80]!r} is not a non-negative integer",
                value=index[:80],
            )
        status = await asyncio.to_thread(uploads.status, line, upload_id)
        data = await read_body(
            request,
            status.meta.chunk_bytes,
            f"chunk {index}",
            f"(chunk_bytes of upload {upload_id})",
            code="invalid-chunk",
        )
        status = await asyncio.to_thread(
            uploads.put_chunk, line, upload_id, int(index), data
        )
        return JSONResponse(status.to_json())

    @app.get(
        prefix + "/{upload_id}", summary="Received and missing chunks of an upload"
    )
    async def upload_status(
        request: Request, line: str, upload_id: str
    ) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        status = await asyncio.to_thread(uploads.status, line, upload_id)
        return JSONResponse(status.to_json())

    @app.post(
        prefix + "/{upload_id}:complete",
        status_code=202,
        summary="Assemble, check and produce the frame; delete the upload on ack",
        responses={
            **ERROR_RESPONSES,
            409: {"description": "chunks missing, or completing already"},
        },
    )
    async def complete_upload(
        request: Request, line: str, upload_id: str
    ) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        edge.require_broker()
        meta, payload = await asyncio.to_thread(uploads.assemble, line, upload_id)
        try:
            fields = FrameFields(
                meta.frame["camera_id"],
                meta.frame["content_type"],
                meta.frame["captured_at_ns"],
                meta.frame.get("frame_id"),
            )
            pending = edge.submit(line, fields, payload)
            del payload
            reply = await pending
        except BaseException:
            uploads.release(upload_id)
            raise
        await asyncio.to_thread(uploads.finish, upload_id)
        return JSONResponse({**reply, "upload_id": upload_id}, status_code=202)

    @app.delete(
        prefix + "/{upload_id}",
        status_code=204,
        summary="Abort an upload and delete its chunks",
    )
    async def abort_upload(request: Request, line: str, upload_id: str) -> Response:
        await edge.open_line(request.headers.get("authorization"), line)
        await asyncio.to_thread(uploads.abort, line, upload_id)
        return Response(status_code=204)


def _add_stream_route(app: FastAPI, edge: IngestEdge) -> None:
    @app.websocket(API_PREFIX + "/stream")
    async def stream(websocket: WebSocket, line: str) -> None:
        try:
            await edge.open_line(websocket.headers.get("authorization"), line)
        except IngestError as error:
            edge.reject(line, error)
            await deny_websocket(websocket, error)
            return
        await websocket.accept()
        await FrameStream(edge, websocket, line).run()


def _add_probe_routes(app: FastAPI, edge: IngestEdge) -> None:
    producer = edge.producer

    @app.get("/healthz", summary="Liveness: 503 after a fatal producer error")
    async def healthz() -> JSONResponse:
        alive = producer.alive()
        body = {"status": "ok" if alive else "failed", "broker": producer.state.value}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get(
        "/readyz", summary="Readiness: 200 only while the producer reaches the broker"
    )
    async def readyz() -> JSONResponse:
        ready = producer.reachable
        body = {"ready": ready, "broker": producer.state.value}
        if ready:
            return JSONResponse(body)
        headers = {"Retry-After": str(edge.settings.ingest_retry_after_s)}
        return JSONResponse(body, status_code=503, headers=headers)

    @app.get("/metrics", summary="Prometheus metrics of this edge")
    async def metrics() -> Response:
        return Response(generate_latest(edge.registry), media_type=CONTENT_TYPE_LATEST)
