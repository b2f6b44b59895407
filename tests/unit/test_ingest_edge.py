"""Unit tests of the ingest edge's checks, envelope and error mapping (no broker)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from prometheus_client import CollectorRegistry

from ingest.edge import create_edge, upload_error
from ingest.metrics import EdgeMetrics
from ingest.producer import EdgeProducer
from ingest.request_parsing import (
    MIN_CAPTURED_AT_NS,
    IngestError,
    frame_fields,
    parse_captured_at,
    pick_field,
    validate_content_type,
    validate_id,
)
from ingest.stream import decode_envelope, encode_envelope
from ingest.uploads import (
    InvalidUploadId,
    UploadExpired,
    UploadIncomplete,
    UploadNotFound,
    UploadStorageFull,
    UploadTooLarge,
)
from pipeline.settings import Settings
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("value", ["cam-1", "92000078", "line3.cam_2", "A", "x" * 64])
def test_validate_id_accepts(value: str) -> None:
    assert validate_id("camera id", value, 64) == value


@pytest.mark.parametrize(
    "value",
    ["../x", "/etc/passwd", "a/b", "..", "a..b", ".hidden", "-x", "", "cam 1",
     "C:\\x", "x" * 65, "cam\x00", "caméra", None, 7],
)  # fmt: skip
def test_validate_id_rejects(value: object) -> None:
    with pytest.raises(IngestError) as caught:
        validate_id("camera id", value, 64)
    assert caught.value.status == 422
    assert caught.value.code == "invalid-header"
    assert "camera id" in caught.value.message


def test_captured_at_accepts_nanoseconds() -> None:
    now_ns = 1_738_310_400_123_456_789
    assert parse_captured_at(now_ns, "captured-at") == now_ns
    assert parse_captured_at(str(now_ns), "captured-at") == now_ns


def test_captured_at_accepts_rfc3339() -> None:
    expected = (
        int(datetime(2025, 1, 31, 8, 0, 0, 123000, tzinfo=UTC).timestamp()) * 10**9
    )
    expected += 123_000_000
    assert parse_captured_at("2025-01-31T08:00:00.123Z", "captured-at") == expected
    assert parse_captured_at("2025-01-31T09:00:00.123+01:00", "captured-at") == expected


@pytest.mark.parametrize(
    "value",
    ["1738310400", "1738310400123", MIN_CAPTURED_AT_NS - 1, "2025-01-31T08:00:00",
     "yesterday", "-5", 2**63, True],
)  # fmt: skip
def test_captured_at_rejects(value: object) -> None:
    with pytest.raises(IngestError) as caught:
        parse_captured_at(value, "Captured-At")
    assert caught.value.status == 422
    assert "Captured-At" in caught.value.message


def test_captured_at_seconds_names_unit() -> None:
    with pytest.raises(IngestError) as caught:
        parse_captured_at("1738310400", "Captured-At")
    assert "nanoseconds" in caught.value.message
    assert caught.value.value == 1738310400
    assert caught.value.limit[0] == MIN_CAPTURED_AT_NS


def test_content_type_accepts_parameters() -> None:
    assert validate_content_type("Image/JPEG; q=0.9") == "image/jpeg"


@pytest.mark.parametrize(
    "value", ["text/plain", "", None, "image/gif", "application/octet-stream"]
)
def test_content_type_rejects(value: str | None) -> None:
    with pytest.raises(IngestError) as caught:
        validate_content_type(value)
    assert caught.value.status == 415
    assert caught.value.limit == ["image/jpeg", "image/png", "image/bmp"]


def test_pick_field_conflict() -> None:
    assert pick_field("Camera-Id", "cam-1", "camera_id", None) == "cam-1"
    assert pick_field("Camera-Id", None, "camera_id", "cam-2") == "cam-2"
    assert pick_field("Camera-Id", "cam-1", "camera_id", "cam-1") == "cam-1"
    with pytest.raises(IngestError) as caught:
        pick_field("Camera-Id", "cam-1", "camera_id", "cam-2")
    assert caught.value.status == 422
    assert caught.value.value == ["cam-1", "cam-2"]


def test_frame_fields_defaults() -> None:
    fields = frame_fields("image/png", "cam-1", None, "")
    assert fields.camera_id == "cam-1"
    assert fields.content_type == "image/png"
    assert fields.captured_at_ns is None
    assert fields.frame_id is None


def test_frame_fields_rejects_path_frame_id() -> None:
    with pytest.raises(IngestError) as caught:
        frame_fields(
            "image/png", "cam-1", None, "../../etc/passwd", names=("a", "b", "Frame-Id")
        )
    assert caught.value.status == 422
    assert "Frame-Id" in caught.value.message


def test_envelope_round_trip() -> None:
    header = {"seq": 3, "camera_id": "cam-1", "content_type": "image/jpeg"}
    payload = b"\xff\xd8\xff" + bytes(range(256)) * 4
    decoded_header, decoded_payload = decode_envelope(encode_envelope(header, payload))
    assert decoded_header == header
    assert decoded_payload == payload


@pytest.mark.parametrize(
    "message",
    [b"", b"\x00\x00", (100).to_bytes(4, "big") + b"{}", (2).to_bytes(4, "big") + b"{x",
     (2).to_bytes(4, "big") + b"[]", (10**6).to_bytes(4, "big") + b"{}" * 10**6],
)  # fmt: skip
def test_envelope_rejects_malformed(message: bytes) -> None:
    with pytest.raises(IngestError) as caught:
        decode_envelope(message)
    assert caught.value.status == 422
    assert caught.value.code == "invalid-envelope"


def test_error_body_and_headers() -> None:
    error = IngestError(
        503, "broker-unavailable", "down", value="unreachable", retry_after_s=2
    )
    assert error.to_json() == {
        "error": "broker-unavailable",
        "status": 503,
        "message": "down",
        "value": "unreachable",
        "limit": None,
        "retry_after_s": 2,
    }
    assert error.headers == {"Retry-After": "2"}
    assert IngestError(401, "unauthorized", "no token").headers == {
        "WWW-Authenticate": "Bearer"
    }


@pytest.mark.parametrize(
    ("error", "status"),
    [(InvalidUploadId("x"), 422), (UploadNotFound("x"), 404), (UploadExpired("x"), 410),
     (UploadTooLarge("x", value=2, limit=1), 413), (UploadIncomplete("x"), 409),
     (UploadStorageFull("x"), 507)],
)  # fmt: skip
def test_upload_error_status(error: Exception, status: int) -> None:
    mapped = upload_error(error)  # type: ignore[arg-type]
    assert mapped.status == status
    assert mapped.code == error.code  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("code", "status"),
    [(KafkaError.MSG_SIZE_TOO_LARGE, 413), (KafkaError.UNKNOWN_TOPIC_OR_PART, 404),
     (KafkaError._UNKNOWN_TOPIC, 404), (KafkaError.INVALID_TIMESTAMP, 422),
     (KafkaError._MSG_TIMED_OUT, 503), (KafkaError._TRANSPORT, 503),
     (KafkaError.NOT_ENOUGH_REPLICAS, 503),
     (KafkaError.TOPIC_AUTHORIZATION_FAILED, 502)],
)  # fmt: skip
def test_delivery_error_status(code: int, status: int) -> None:
    producer = EdgeProducer(Settings(), EdgeMetrics(CollectorRegistry()))
    error = producer.delivery_error(KafkaError(code), "line-1", 123)
    assert error.status == status
    assert "frames.line-1" in error.message
    if status == 503:
        assert error.retry_after_s == Settings().ingest_retry_after_s
    if status == 413:
        # The topic's own limit is below the edge's; the message names both settings.
        assert error.value == 123
        assert "max.message.bytes" in error.message
        assert str(Settings().max_message_bytes) in error.message


def test_queue_bytes_below_frame_rejected() -> None:
    from pipeline.errors import ConfigError

    settings = Settings(
        max_message_bytes=8 * 1024 * 1024, ingest_queue_max_bytes=4 * 1024 * 1024
    )
    with pytest.raises(ConfigError, match="FAULTLINE_INGEST_QUEUE_MAX_BYTES"):
        EdgeProducer(settings, EdgeMetrics(CollectorRegistry()))


def test_metrics_labels_only_line_and_reason(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    create_edge(Settings(home=tmp_path), registry)
    # A second app with its own registry registers the same names again.
    create_edge(Settings(home=tmp_path), CollectorRegistry())
    names = {family.name for family in registry.collect()}
    for name in (
        "faultline_ingest_frames_accepted",
        "faultline_ingest_accepted_bytes",
        "faultline_ingest_frames_rejected",
        "faultline_ingest_produce_seconds",
        "faultline_ingest_frames_in_flight",
        "faultline_ingest_broker_reachable",
    ):
        assert name in names
    labels = set()
    for collector in vars(EdgeMetrics(CollectorRegistry())).values():
        labels.update(getattr(collector, "_labelnames", ()))
    assert labels == {"line", "reason"}


def test_edge_imports_without_heavy_packages() -> None:
    code = (
        "import sys, ingest.edge, ingest.camera, ingest.uploads, ingest.metrics\n"
        "heavy = [m for m in ('torch', 'ultralytics', 'chdb') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
