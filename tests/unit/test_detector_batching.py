"""Batch composition must not change detections, on either backend.

The same frames go through the shipped model in batches of 1, 7 and 32,
mixing 8-bit mono and BGR colour images of several sizes in one batch. Each
image is letterboxed on its own and its boxes come back in its own pixels, so
every batching must give the same detections: same count and classes, boxes
within 1e-3 px, scores within 1e-4. The confidence threshold is 0.001, so that
even an early checkpoint yields boxes to compare.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from agents.batch import decode
from ingest.simulator import render_board
from models.registry import Registry, load_detector
from pipeline.settings import DEFAULT_REGISTRY
from schemas import Detection

LOW_CONF = 0.001
BOX_TOLERANCE_PX = 1e-3
SCORE_TOLERANCE = 1e-4
BATCH_SIZES = (1, 7, 32)


@pytest.fixture(scope="module", params=["torch", "onnx"])
def detector(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    spec = Registry(DEFAULT_REGISTRY).get()
    if request.param == "onnx":
        assert spec.onnx is not None and spec.onnx.is_file(), (
            f"shipped ONNX model missing at {spec.onnx}; "
            f"run `faultline export --model {spec.name}`"
        )
    return load_detector(
        replace(spec, backend=request.param, conf=LOW_CONF), device="cpu"
    )


def tinted(mono: np.ndarray) -> np.ndarray:
    """Return a BGR image whose three channels differ, made from a mono one."""
    bgr = cv2.cvtColor(mono, cv2.COLOR_GRAY2BGR).astype(np.int16)
    bgr[:, :, 0] = bgr[:, :, 0] * 3 // 4
    bgr[:, :, 2] = 255 - (255 - bgr[:, :, 2]) * 2 // 3
    return bgr.astype(np.uint8)


def simulator_frames() -> list[tuple[str, np.ndarray]]:
    """32 frames: 640 px mono boards, boards resized to other shapes, colour ones."""
    frames = []
    for seed in range(32):
        board = render_board(seed).image
        kind = seed % 4
        if kind == 0:
            frames.append((f"seed {seed} 640x640 mono", board))
        elif kind == 1:
            frames.append((f"seed {seed} 800x480 mono", cv2.resize(board, (800, 480))))
        elif kind == 2:
            image = tinted(cv2.resize(board, (333, 517)))
            frames.append((f"seed {seed} 333x517 colour", image))
        else:
            frames.append(
                (f"seed {seed} 1024x768 colour", tinted(cv2.resize(board, (1024, 768))))
            )
    return frames


def run_in_batches(
    detector, images: Sequence[np.ndarray], size: int
) -> list[list[Detection]]:  # type: ignore[no-untyped-def]
    results: list[list[Detection]] = []
    for start in range(0, len(images), size):
        results.extend(detector.predict(images[start : start + size]))
    return results


def mismatches(
    expected: list[Detection],
    actual: list[Detection],
    box_tolerance: float,
    score_tolerance: float,
) -> Iterator[str]:
    """Describe each detection of ``expected`` without a close twin in ``actual``."""
    if len(expected) != len(actual):
        yield f"{len(expected)} detections became {len(actual)}"
        return
    unused = list(actual)
    for detection in expected:
        twins = [d for d in unused if d.class_id == detection.class_id]
        if not twins:
            yield f"no {detection.class_name} detection left for {detection}"
            continue
        twin = min(twins, key=lambda d: box_distance(d, detection))
        unused.remove(twin)
        if box_distance(twin, detection) > box_tolerance:
            moved = box_distance(twin, detection)
            yield f"box moved {moved:.2e} px: {detection} -> {twin}"
        if abs(twin.confidence - detection.confidence) > score_tolerance:
            change = twin.confidence - detection.confidence
            yield f"score changed by {change:+.2e}: {detection}"


def box_distance(a: Detection, b: Detection) -> float:
    return max(abs(a.x1 - b.x1), abs(a.y1 - b.y1), abs(a.x2 - b.x2), abs(a.y2 - b.y2))


def assert_same_per_batching(
    detector, frames: list[tuple[str, np.ndarray]]
) -> list[list[Detection]]:  # type: ignore[no-untyped-def]
    names = [name for name, _ in frames]
    images = [image for _, image in frames]
    reference = run_in_batches(detector, images, BATCH_SIZES[0])
    for size in BATCH_SIZES[1:]:
        batched = run_in_batches(detector, images, size)
        problems = [
            f"{name} (batch {size}): {problem}"
            for name, expected, actual in zip(names, reference, batched, strict=True)
            for problem in mismatches(
                expected, actual, BOX_TOLERANCE_PX, SCORE_TOLERANCE
            )
        ]
        assert not problems, "\n".join(problems[:20])
    return reference


def assert_boxes_inside(
    frames: list[tuple[str, np.ndarray]], results: list[list[Detection]]
) -> None:
    for (name, image), detections in zip(frames, results, strict=True):
        height, width = image.shape[:2]
        for d in detections:
            assert 0 <= d.x1 <= d.x2 <= width, f"{name}: x outside 0..{width}: {d}"
            assert 0 <= d.y1 <= d.y2 <= height, f"{name}: y outside 0..{height}: {d}"


def test_batching_simulator_frames(detector) -> None:  # type: ignore[no-untyped-def]
    frames = simulator_frames()
    results = assert_same_per_batching(detector, frames)
    assert_boxes_inside(frames, results)
    assert sum(len(r) for r in results) > 0, (
        "no detections at conf 0.001: nothing was compared"
    )
    other_sizes = [
        r for (name, _), r in zip(frames, results, strict=True) if "640x640" not in name
    ]
    assert any(other_sizes), (
        "no detections on resized or colour frames: letterboxing untested"
    )


def test_batching_deeppcb_and_photos(detector, deeppcb: Path, photos: Path) -> None:  # type: ignore[no-untyped-def]
    val_images = sorted((deeppcb / "images" / "val").glob("*.jpg"))[:28]
    files = val_images + sorted(photos.glob("*.jpg"))
    frames = [(path.name, decode(path.read_bytes())) for path in files]
    assert any(image.ndim == 2 for _, image in frames), "expected mono DeepPCB frames"
    assert any(image.ndim == 3 for _, image in frames), "expected colour photos"
    results = assert_same_per_batching(detector, frames)
    assert_boxes_inside(frames, results)
    assert sum(len(r) for r in results) > 0, (
        "no detections at conf 0.001: nothing was compared"
    )
