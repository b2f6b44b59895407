"""BatchProcessor with a stand-in detector: no broker, no torch."""

import asyncio
from collections.abc import Sequence

import cv2
import numpy as np
import pytest

from agents.batch import BatchProcessor, FrameMessage, InferenceThread
from models.registry import ModelSpec
from schemas import Detection, FrameHeaders


class BoxDetector:
    """Returns one box covering the image; fails on images wider than fail_width."""

    name = "box"
    version = "1"
    classes = ("open",)
    device = "cpu"

    def __init__(self, fail_width: int | None = None) -> None:
        self.fail_width = fail_width
        self.batches: list[int] = []

    def predict(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        self.batches.append(len(images))
        if self.fail_width and any(image.shape[1] == self.fail_width for image in images):
            raise RuntimeError("bad frame")
        return [[Detection(0, "open", 0.9, 0, 0, image.shape[1], image.shape[0])] for image in images]


SPEC = ModelSpec(name="box", version="1", backend="torch", weights=None, classes=("open",))  # type: ignore[arg-type]


def message(offset: int, payload: bytes, content_type: str = "image/jpeg", headers=None) -> FrameMessage:  # type: ignore[no-untyped-def]
    if headers is None:
        headers = FrameHeaders.new("line-1", "cam-1", content_type, frame_id=f"f{offset}").to_kafka()
    return FrameMessage("frames.line-1", 0, offset, b"cam-1", payload, headers)


def jpeg(width: int = 64, height: int = 48) -> bytes:
    return cv2.imencode(".jpg", np.full((height, width), 255, np.uint8))[1].tobytes()


def run(detector: BoxDetector, messages: list[FrameMessage]):  # type: ignore[no-untyped-def]
    processor = BatchProcessor(SPEC, InferenceThread(lambda: detector))
    try:
        return asyncio.run(processor.process(messages))
    finally:
        processor.close()


def test_one_outcome_per_frame_in_order() -> None:
    detector = BoxDetector()
    good = jpeg()
    outcomes = run(detector, [message(i, good) for i in range(5)])
    assert [o.message.offset for o in outcomes] == [0, 1, 2, 3, 4]
    assert all(o.result is not None for o in outcomes)
    assert detector.batches == [5]


def test_result_fields() -> None:
    outcome = run(BoxDetector(), [message(7, jpeg(64, 48))])[0]
    record = outcome.result
    assert record is not None
    assert (record.image_width, record.image_height) == (64, 48)
    assert record.source_offset == 7
    assert record.frame_id == "f7"
    assert record.verdict == "fail"
    assert record.latency.batch_size == 1
    assert record.detections[0].x2 == 64


def test_truncated_jpeg_dead_lettered() -> None:
    good = jpeg()
    outcomes = run(BoxDetector(), [message(0, good), message(1, good[: len(good) // 2]), message(2, good)])
    assert outcomes[0].result is not None
    assert outcomes[2].result is not None
    dead = outcomes[1].deadletter
    assert dead is not None
    assert dead.reason == "decode-failed"
    assert dead.stage == "decode"
    assert dead.source_offset == 1
    assert "truncated" in dead.message


def test_missing_headers_dead_lettered() -> None:
    outcome = run(BoxDetector(), [message(3, jpeg(), headers=[("frame-id", b"x")])])[0]
    assert outcome.deadletter is not None
    assert outcome.deadletter.reason == "invalid-headers"


def test_inference_failure_isolated() -> None:
    detector = BoxDetector(fail_width=99)
    outcomes = run(detector, [message(0, jpeg(64)), message(1, jpeg(99)), message(2, jpeg(64))])
    assert outcomes[0].result is not None
    assert outcomes[2].result is not None
    dead = outcomes[1].deadletter
    assert dead is not None
    assert dead.reason == "inference-failed"
    assert dead.attempts == 2
    assert detector.batches == [3, 1, 1, 1]


@pytest.mark.parametrize("ext,content_type", [(".png", "image/png"), (".bmp", "image/bmp")])
def test_png_and_bmp_decoded(ext: str, content_type: str) -> None:
    payload = cv2.imencode(ext, np.zeros((10, 20, 3), np.uint8))[1].tobytes()
    outcome = run(BoxDetector(), [message(0, payload, content_type)])[0]
    assert outcome.result is not None
    assert outcome.result.image_width == 20
