"""Frame headers, result records and dead-letter records, version 1.

A frame message's value is the encoded image exactly as the camera sent it;
everything else travels in Kafka headers (``FrameHeaders``). A result is one
JSON object per frame (``ResultRecord``), boxes in source-image pixels. A
dead letter keeps the original value and headers untouched and adds
``deadletter-*`` headers (``DeadLetter``). JSON Schema files for all three sit
in ``schemas/json/``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import FaultlineError

SCHEMA_VERSION = 1
JSON_SCHEMA_DIR = Path(__file__).parent / "json"

CONTENT_TYPES = ("image/jpeg", "image/png", "image/bmp")
Verdict = Literal["pass", "fail"]
Header = tuple[str, bytes]


class HeaderError(FaultlineError):
    """A frame's headers are missing a field or carry an invalid value."""


def _text(headers: dict[str, bytes], name: str) -> str:
    try:
        return headers[name].decode("utf-8")
    except KeyError:
        raise HeaderError(f"header {name!r} is missing") from None
    except UnicodeDecodeError:
        raise HeaderError(f"header {name!r} is not valid UTF-8") from None


def _int(headers: dict[str, bytes], name: str) -> int:
    value = _text(headers, name)
    try:
        return int(value)
    except ValueError:
        raise HeaderError(f"header {name!r}={value!r} is not an integer") from None


def headers_dict(headers: Any) -> dict[str, bytes]:
    """Normalise Kafka headers (list of pairs, dict or None) to a dict."""
    if not headers:
        return {}
    items = headers.items() if isinstance(headers, dict) else headers
    result: dict[str, bytes] = {}
    for key, value in items:
        if isinstance(value, str):
            value = value.encode("utf-8")
        result[key] = value if value is not None else b""
    return result


@dataclass(frozen=True)
class FrameHeaders:
    """Headers of a frame message. Times are epoch nanoseconds."""

    frame_id: str
    line_id: str
    camera_id: str
    captured_at_ns: int
    content_type: str
    trace_id: str = ""
    ingested_at_ns: int = 0
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def new(
        cls,
        line_id: str,
        camera_id: str,
        content_type: str,
        captured_at_ns: int | None = None,
        frame_id: str | None = None,
    ) -> FrameHeaders:
        now = time.time_ns()
        return cls(
            frame_id=frame_id or uuid.uuid4().hex,
            line_id=line_id,
            camera_id=camera_id,
            captured_at_ns=captured_at_ns if captured_at_ns is not None else now,
            content_type=content_type,
            trace_id=uuid.uuid4().hex,
            ingested_at_ns=now,
        )

    def to_kafka(self) -> list[Header]:
        pairs = [
            ("frame-id", self.frame_id),
            ("line-id", self.line_id),
            ("camera-id", self.camera_id),
            ("captured-at", str(self.captured_at_ns)),
            ("content-type", self.content_type),
            ("schema-version", str(self.schema_version)),
            ("trace-id", self.trace_id),
            ("ingested-at", str(self.ingested_at_ns)),
        ]
        return [(name, value.encode("utf-8")) for name, value in pairs]

    @classmethod
    def from_kafka(cls, headers: Any) -> FrameHeaders:
        """Parse and check frame headers; raise HeaderError naming the bad one."""
        values = headers_dict(headers)
        version = _int(values, "schema-version")
        if version != SCHEMA_VERSION:
            raise HeaderError(
                f"header 'schema-version'={version} is not supported; "
                f"this worker reads version {SCHEMA_VERSION}"
            )
        content_type = _text(values, "content-type")
        if content_type not in CONTENT_TYPES:
            raise HeaderError(
                f"header 'content-type'={content_type!r} is not supported; "
                f"use one of {', '.join(CONTENT_TYPES)}"
            )
        captured = _int(values, "captured-at")
        ingested = _int(values, "ingested-at") if "ingested-at" in values else captured
        return cls(
            frame_id=_text(values, "frame-id"),
            line_id=_text(values, "line-id"),
            camera_id=_text(values, "camera-id"),
            captured_at_ns=captured,
            content_type=content_type,
            trace_id=values.get("trace-id", b"").decode("utf-8", "replace"),
            ingested_at_ns=ingested,
            schema_version=version,
        )


@dataclass(frozen=True)
class Detection:
    """One detected defect; the box is x1 y1 x2 y2 in source-image pixels."""

    class_id: int
    class_name: str
    confidence: float
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class StageLatency:
    """Seconds spent per stage for one frame.

    ``queue_s`` runs from ingest to the start of the batch, ``decode_s`` is
    this frame's decode, ``inference_s`` the whole batch's forward pass
    (shared by ``batch_size`` frames) and ``total_s`` ingest to result.
    """

    queue_s: float
    decode_s: float
    inference_s: float
    total_s: float
    batch_size: int


@dataclass(frozen=True)
class ResultRecord:
    frame_id: str
    line_id: str
    camera_id: str
    captured_at_ns: int
    ingested_at_ns: int
    inferred_at_ns: int
    model_name: str
    model_version: str
    image_width: int
    image_height: int
    detections: tuple[Detection, ...]
    verdict: Verdict
    latency: StageLatency
    source_topic: str
    source_partition: int
    source_offset: int
    run_id: str = ""
    trace_id: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> bytes:
        body = asdict(self)
        body["detections"] = [asdict(d) for d in self.detections]
        return json.dumps(body, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, payload: bytes | str) -> ResultRecord:
        body = json.loads(payload)
        if body.get("schema_version") != SCHEMA_VERSION:
            raise HeaderError(
                f"result schema_version={body.get('schema_version')!r} is not "
                f"supported; expected {SCHEMA_VERSION}"
            )
        body["detections"] = tuple(Detection(**d) for d in body["detections"])
        body["latency"] = StageLatency(**body["latency"])
        return cls(**body)


DEADLETTER_PREFIX = "deadletter-"


@dataclass(frozen=True)
class DeadLetter:
    """Reason and position of a dead-lettered frame, sent as ``deadletter-*`` headers."""

    reason: str
    message: str
    stage: str
    source_topic: str
    source_partition: int
    source_offset: int
    attempts: int = 1
    failed_at_ns: int = field(default_factory=time.time_ns)

    def to_kafka(self) -> list[Header]:
        pairs = {
            "reason": self.reason,
            "message": self.message[:2000],
            "stage": self.stage,
            "source-topic": self.source_topic,
            "source-partition": str(self.source_partition),
            "source-offset": str(self.source_offset),
            "attempts": str(self.attempts),
            "failed-at": str(self.failed_at_ns),
        }
        return [(DEADLETTER_PREFIX + k, v.encode("utf-8")) for k, v in pairs.items()]

    @classmethod
    def from_kafka(cls, headers: Any) -> DeadLetter:
        values = headers_dict(headers)

        def get(name: str) -> str:
            return _text(values, DEADLETTER_PREFIX + name)

        return cls(
            reason=get("reason"),
            message=get("message"),
            stage=get("stage"),
            source_topic=get("source-topic"),
            source_partition=int(get("source-partition")),
            source_offset=int(get("source-offset")),
            attempts=int(get("attempts")),
            failed_at_ns=int(get("failed-at")),
        )

    def attach(self, original_headers: Any) -> list[Header]:
        """Return the original headers untouched, followed by this record's."""
        kept = [
            (k, v if isinstance(v, bytes) else str(v).encode("utf-8"))
            for k, v in (original_headers.items() if isinstance(original_headers, dict) else original_headers or [])
            if not k.startswith(DEADLETTER_PREFIX)
        ]
        return kept + self.to_kafka()


def load_json_schema(name: str) -> dict[str, Any]:
    """Load ``schemas/json/<name>.v1.schema.json``."""
    path = JSON_SCHEMA_DIR / f"{name}.v{SCHEMA_VERSION}.schema.json"
    return json.loads(path.read_text())
