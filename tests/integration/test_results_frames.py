"""Frame fetch by topic, partition and offset from real Kafka, with view tokens.

One ``faultline serve`` process serves the whole module; frames come from the
line simulator with the real header contract.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import httpx
import numpy as np
import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.kafka import admin_config, ensure_line_topics
from pipeline.topics import frames_topic
from tests.conftest import Processes
from tests.integration.results_harness import (
    ProducedFrame,
    ResultsEdge,
    produce_frames,
    produce_results,
    result_of_frame,
)

pytestmark = pytest.mark.integration

VIEW = {"Authorization": "Bearer view-line"}


@dataclass
class FrameEdge:
    edge: ResultsEdge
    line: str
    other_line: str

    def get(
        self, path: str, headers: dict[str, str] | None = VIEW, **params: str
    ) -> httpx.Response:
        return httpx.get(
            self.edge.url + path, headers=headers, params=params, timeout=30
        )


@pytest.fixture(scope="module")
def frame_edge(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FrameEdge]:
    home = tmp_path_factory.mktemp("frame-edge")
    line, other = f"t-{uuid.uuid4().hex[:12]}", f"t-{uuid.uuid4().hex[:12]}"
    tokens = {
        "tokens": [
            {"token": "view-line", "roles": ["view"], "lines": [line]},
            {"token": "view-other", "roles": ["view"], "lines": [other]},
            {"token": "view-all", "roles": ["view"], "lines": ["*"]},
        ]
    }
    processes = Processes(home)
    try:
        edge = ResultsEdge(
            processes, kafka_bootstrap, [line, other], home,
            extra_env={"FAULTLINE_TOKENS": json.dumps(tokens)},
        )  # fmt: skip
        edge.start()
        yield FrameEdge(edge, line, other)
    finally:
        processes.stop_all()


def frame_path(frame: ProducedFrame, line: str) -> str:
    return f"/v1/frames/{frames_topic(line)}/{frame.partition}/{frame.offset}"


def test_fetch_returns_ingested_bytes(frame_edge: FrameEdge) -> None:
    line = frame_edge.line
    frames = produce_frames(frame_edge.edge.settings, line, 6)
    for index, fmt in enumerate(("png", "bmp")):
        frames += produce_frames(
            frame_edge.edge.settings, line, 2, seed=index + 1, fmt=fmt
        )
    content_types = set()
    for frame in frames:
        response = frame_edge.get(frame_path(frame, line))
        assert response.status_code == 200, response.text
        assert hashlib.sha256(response.content).hexdigest() == frame.sha256
        assert response.headers["content-type"] == frame.shot.content_type
        assert response.headers["x-frame-id"] == frame.frame_id
        assert response.headers["x-camera-id"] == frame.shot.camera_id
        content_types.add(response.headers["content-type"])
    assert content_types == {"image/jpeg", "image/png", "image/bmp"}


def is_red(pixel: np.ndarray) -> bool:
    blue, green, red = (int(value) for value in pixel)
    return red > 180 and green < 90 and blue < 90


def test_fetch_annotated_draws_stored_boxes(frame_edge: FrameEdge) -> None:
    line = frame_edge.line
    frame = produce_frames(frame_edge.edge.settings, line, 1, seed=42)[0]
    path = frame_path(frame, line)
    before = frame_edge.get(path, annotated="1")
    assert before.status_code == 404
    assert "no stored result" in before.json()["detail"]

    produce_results(frame_edge.edge.settings, [result_of_frame(line, frame)])
    deadline = time.monotonic() + 30
    response = frame_edge.get(path, annotated="1")
    while response.status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.3)
        response = frame_edge.get(path, annotated="1")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    defects = frame.shot.frame.defects
    assert response.headers["x-detections"] == str(len(defects))
    image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (640, 640, 3)
    # The source frame is black and white only, so red pixels come from boxes.
    for truth in defects:
        left, right = round(truth.x1), round(truth.x2)
        middle_y = round((truth.y1 + truth.y2) / 2)
        assert is_red(image[middle_y, left]), f"no box edge at x={left} for {truth}"
        assert is_red(image[middle_y, right]), f"no box edge at x={right} for {truth}"


def test_fetch_missing_positions_404(frame_edge: FrameEdge) -> None:
    line = frame_edge.line
    frame = produce_frames(frame_edge.edge.settings, line, 1, seed=7)[0]
    topic = frames_topic(line)
    beyond = frame.offset + 1000
    cases = {
        f"/v1/frames/{topic}/{frame.partition}/{beyond}": "the next offset is",
        f"/v1/frames/{topic}/99/0": "has no partition 99",
        f"/v1/frames/frames.t-{uuid.uuid4().hex[:12]}/0/0": "does not exist",
        f"/v1/frames/results.{line}/0/0": "is not a frames.<line> topic",
    }
    for path, detail in cases.items():
        response = frame_edge.get(path, headers={"Authorization": "Bearer view-all"})
        assert response.status_code == 404, path
        assert detail in response.json()["detail"], path


def test_fetch_deleted_by_retention_404(frame_edge: FrameEdge) -> None:
    line = frame_edge.other_line
    settings = frame_edge.edge.settings
    ensure_line_topics(settings, line)
    # Frames of one camera share a partition (key = camera id).
    produced = produce_frames(settings, line, 4, seed=3)
    partition = produced[0].partition
    frames = sorted(
        (f for f in produced if f.partition == partition), key=lambda f: f.offset
    )
    first, last = frames[0], frames[-1]
    assert last.offset > first.offset
    headers = {"Authorization": "Bearer view-other"}
    assert frame_edge.get(frame_path(first, line), headers=headers).status_code == 200

    # Delete what retention would: every record before the last one.
    admin = AdminClient(admin_config(settings))
    futures = admin.delete_records(
        [TopicPartition(frames_topic(line), partition, last.offset)]
    )
    for future in futures.values():
        future.result(timeout=30)

    gone = frame_edge.get(frame_path(first, line), headers=headers)
    assert gone.status_code == 404
    assert "deleted by retention" in gone.json()["detail"]
    kept = frame_edge.get(frame_path(last, line), headers=headers)
    assert kept.status_code == 200
    assert hashlib.sha256(kept.content).hexdigest() == last.sha256


def test_fetch_needs_view_token(frame_edge: FrameEdge) -> None:
    line = frame_edge.line
    frame = produce_frames(frame_edge.edge.settings, line, 1, seed=9)[0]
    path = frame_path(frame, line)
    assert frame_edge.get(path, headers=None).status_code == 401
    forbidden = frame_edge.get(path, headers={"Authorization": "Bearer view-other"})
    assert forbidden.status_code == 403
    by_query = frame_edge.get(path, headers=None, token="view-line")
    assert by_query.status_code == 200
    assert hashlib.sha256(by_query.content).hexdigest() == frame.sha256
