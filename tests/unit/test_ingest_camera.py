"""Unit tests of ``faultline camera``: retries, backoff, pacing, progress, sources.

In the HTTP retry tests an httpx MockTransport replies in place of the edge.
The integration tests run the camera against the real edge and broker.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from ingest.camera import (
    CameraError,
    CameraOptions,
    CameraReport,
    HttpSender,
    Pacer,
    ProgressLine,
    backoff_delay_s,
    camera_frames,
    video_frames,
)
from ingest.feed import SourceFrame
from pipeline.errors import ConfigError
from schemas.images import sniff_content_type

FRAME = SourceFrame(
    "cam-1", b"\xff\xd8\xff\xe0jpeg\xff\xd9", "image/jpeg", "test-frame", frame_id="f-1"
)
ACK = {"frame_id": "f-1", "topic": "frames.line-1", "partition": 0, "offset": 7}


def sender_for(
    replies: list[httpx.Response | Exception], max_retries: int = 3
) -> tuple[HttpSender, CameraReport, list[float], list[httpx.Request]]:
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    report = CameraReport()
    sleeps: list[float] = []
    options = CameraOptions(
        line="line-1", max_retries=max_retries, backoff_s=0.1, max_backoff_s=1.0
    )
    client = httpx.Client(base_url="http://edge", transport=httpx.MockTransport(answer))
    acks: list[dict[str, object]] = []
    sender = HttpSender(
        options, report, acks.append, client=client, sleep=sleeps.append
    )
    return sender, report, sleeps, requests


def error_reply(status: int, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after else {}
    body = {"error": "broker-unavailable", "status": status, "message": "down"}
    return httpx.Response(status, json=body, headers=headers)


def test_http_retries_503_honours_retry_after() -> None:
    sender, report, sleeps, requests = sender_for(
        [error_reply(503, "1"), error_reply(429, "2"), httpx.Response(202, json=ACK)]
    )
    sender.send(FRAME)
    assert report.acked == 1
    assert report.failed == 0
    assert report.retries == 2
    assert report.sent == 1
    assert sleeps[0] >= 1.0
    assert sleeps[1] >= 2.0
    # Every attempt carries the same frame id and capture time.
    assert {r.headers["Frame-Id"] for r in requests} == {"f-1"}
    assert len({r.headers["Captured-At"] for r in requests}) == 1
    assert requests[0].headers["Camera-Id"] == "cam-1"


def test_http_retries_keep_generated_frame_id() -> None:
    sender, report, _, requests = sender_for(
        [error_reply(503), httpx.Response(202, json=ACK)]
    )
    sender.send(SourceFrame("cam-1", FRAME.payload, "image/jpeg", "no-id"))
    assert report.acked == 1
    frame_ids = {request.headers["Frame-Id"] for request in requests}
    assert len(requests) == 2
    assert len(frame_ids) == 1
    assert len(frame_ids.pop()) == 32


def test_http_connection_errors_give_up() -> None:
    refused = httpx.ConnectError("connection refused")
    sender, report, sleeps, _ = sender_for([refused] * 4, max_retries=3)
    sender.send(FRAME)
    assert report.acked == 0
    assert report.failed == 1
    assert report.retries == 3
    assert len(sleeps) == 3
    assert "gave up after 3 retries" in report.errors[0]


def test_http_415_not_retried() -> None:
    sender, report, sleeps, requests = sender_for([error_reply(415)])
    sender.send(FRAME)
    assert report.failed == 1
    assert report.retries == 0
    assert sleeps == []
    assert len(requests) == 1
    assert "415" in report.errors[0]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_http_auth_or_line_error_stops(status: int) -> None:
    sender, report, _, _ = sender_for([error_reply(status)])
    with pytest.raises(CameraError, match=str(status)):
        sender.send(FRAME)


def test_backoff_grows_and_caps() -> None:
    delays = [backoff_delay_s(attempt, None, 0.5, 4.0) for attempt in range(6)]
    for attempt, delay in enumerate(delays):
        ceiling = min(4.0, 0.5 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert backoff_delay_s(0, 3.0, 0.5, 4.0) == 3.0


def test_pacer_spaces_sends() -> None:
    pacer = Pacer(10.0)
    assert pacer.delay_s() == 0.0
    assert 0.05 < pacer.delay_s() <= 0.1
    assert Pacer(0).delay_s() == 0.0


def test_progress_line_renders_counts() -> None:
    report = CameraReport(total=10, sent=6, acked=5, failed=1, retries=2)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = ProgressLine("line-1 via ws", stream)
    progress.update(report, force=True)
    progress.close(report)
    text = stream.getvalue()
    assert "6/10" in text
    assert "sent 6 acked 5 failed 1 retries 2" in text
    assert text.endswith("\n")
    assert ProgressLine("x", io.StringIO()).enabled is False


def write_video(path: Path, frames: int) -> None:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for index in range(frames):
        writer.write(np.full((48, 64, 3), index * 20 % 256, dtype=np.uint8))
    writer.release()


def test_video_frames_jpeg_encoded(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, 5)
    frames = list(video_frames(video, "cam-7", quality=80))
    assert len(frames) == 5
    for frame in frames:
        assert sniff_content_type(frame.payload) == "image/jpeg"
        assert frame.camera_id == "cam-7"
        assert frame.content_type == "image/jpeg"
    limited, total = camera_frames(str(video), "line-1", camera_id="cam-7", count=3)
    assert total == 3
    assert len(list(limited)) == 3


@pytest.mark.parametrize(
    ("source", "setup"),
    [
        ("missing", lambda path: None),
        ("notvideo.avi", lambda path: path.write_bytes(b"no video")),
    ],
)
def test_camera_source_invalid(
    tmp_path: Path, source: str, setup: Callable[[Path], None]
) -> None:
    path = tmp_path / source
    setup(path)
    with pytest.raises(ConfigError):
        frames, _ = camera_frames(str(path), "line-1")
        list(frames)
