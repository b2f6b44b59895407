import json

import jsonschema
import pytest

from schemas import (
    SCHEMA_VERSION,
    DeadLetter,
    Detection,
    FrameHeaders,
    HeaderError,
    ResultRecord,
    StageLatency,
)
from schemas.records import load_json_schema


def make_result(**overrides) -> ResultRecord:  # type: ignore[no-untyped-def]
    fields = dict(
        frame_id="f-1",
        line_id="line-1",
        camera_id="cam-1",
        captured_at_ns=1_700_000_000_000_000_000,
        ingested_at_ns=1_700_000_000_100_000_000,
        inferred_at_ns=1_700_000_000_300_000_000,
        model_name="pcb",
        model_version="1",
        image_width=640,
        image_height=480,
        detections=(Detection(1, "short", 0.9, 10.5, 20.25, 40.0, 60.0),),
        verdict="fail",
        latency=StageLatency(0.1, 0.002, 0.05, 0.2, 8),
        source_topic="frames.line-1",
        source_partition=2,
        source_offset=1041,
    )
    fields.update(overrides)
    return ResultRecord(**fields)


def test_result_json_roundtrip() -> None:
    record = make_result()
    assert ResultRecord.from_json(record.to_json()) == record


def test_result_matches_json_schema() -> None:
    body = json.loads(make_result().to_json())
    jsonschema.validate(body, load_json_schema("result"))


def test_result_schema_rejects_missing_field() -> None:
    body = json.loads(make_result().to_json())
    del body["source_offset"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, load_json_schema("result"))


def test_result_wrong_version_rejected() -> None:
    body = json.loads(make_result().to_json())
    body["schema_version"] = 99
    with pytest.raises(HeaderError, match="schema_version=99"):
        ResultRecord.from_json(json.dumps(body))


def test_frame_headers_roundtrip() -> None:
    headers = FrameHeaders.new("line-1", "cam-7", "image/png", captured_at_ns=123)
    parsed = FrameHeaders.from_kafka(headers.to_kafka())
    assert parsed == headers
    assert parsed.schema_version == SCHEMA_VERSION


def test_frame_headers_match_json_schema() -> None:
    headers = FrameHeaders.new("line-1", "cam-7", "image/jpeg")
    body = {k: v.decode() for k, v in headers.to_kafka()}
    jsonschema.validate(body, load_json_schema("frame-headers"))


@pytest.mark.parametrize(
    ("drop", "replace", "message"),
    [
        ("frame-id", None, "'frame-id' is missing"),
        ("schema-version", None, "'schema-version' is missing"),
        (None, ("captured-at", b"yesterday"), "not an integer"),
        (None, ("content-type", b"image/gif"), "not supported"),
        (None, ("schema-version", b"7"), "not supported"),
    ],
)
def test_frame_headers_invalid(drop, replace, message) -> None:  # type: ignore[no-untyped-def]
    pairs = dict(FrameHeaders.new("line-1", "cam-1", "image/jpeg").to_kafka())
    if drop:
        del pairs[drop]
    if replace:
        pairs[replace[0]] = replace[1]
    with pytest.raises(HeaderError, match=message):
        FrameHeaders.from_kafka(list(pairs.items()))


def test_deadletter_keeps_original_headers() -> None:
    original = FrameHeaders.new("line-1", "cam-1", "image/jpeg").to_kafka()
    record = DeadLetter("decode-failed", "truncated", "decode", "frames.line-1", 0, 17)
    headers = record.attach(original)
    assert headers[: len(original)] == original
    assert DeadLetter.from_kafka(headers) == record
    body = {k: v.decode() for k, v in headers if k.startswith("deadletter-")}
    jsonschema.validate(body, load_json_schema("deadletter-headers"))
