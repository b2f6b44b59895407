"""Frames over the ingest edge's HTTP and WebSocket routes land whole and in order.

Each test runs the edge in this process against the session's real broker,
sends frames, then reads ``frames.<line>`` back and checks every message:
headers, key, Kafka timestamp, bytes, and the partition and offset that its
ack reported. One camera's frames must keep the order in which they were sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from websockets.exceptions import ConnectionClosedError

from ingest.edge import running_edge
from ingest.feed import SourceFrame, simulator_frames
from ingest.stream import encode_envelope
from pipeline.kafka import consumer_config, ensure_line_topics
from pipeline.settings import Settings
from pipeline.topics import frames_topic
from schemas.records import FrameHeaders

pytestmark = pytest.mark.integration

REAL_FRAME_COUNT = 1000
SIMULATED_FRAME_COUNT = 200

EdgeFactory = Callable[..., tuple[str, Settings]]


@dataclass(frozen=True)
class SentFrame:
    frame_id: str
    camera_id: str
    content_type: str
    sha256: str
    captured_at_ns: int


@pytest.fixture
def start_edge(
    kafka_bootstrap: str, line_id: str, tmp_path: Path
) -> Iterator[EdgeFactory]:
    """Return a function that starts an edge for ``line_id`` with setting overrides."""
    with ExitStack() as stack:

        def start(**overrides: Any) -> tuple[str, Settings]:
            settings = Settings(
                bootstrap_servers=kafka_bootstrap, home=tmp_path, **overrides
            )
            ensure_line_topics(settings, line_id)
            return stack.enter_context(running_edge(settings)), settings

        yield start


def real_frames(deeppcb: Path, photos: Path) -> list[SourceFrame]:
    """996 DeepPCB boards on two cameras and the four colour photos on a third."""
    boards = sorted((deeppcb / "images").rglob("*.jpg"))[: REAL_FRAME_COUNT - 4]
    frames = [
        SourceFrame(
            f"pcb-{index % 2}",
            path.read_bytes(),
            "image/jpeg",
            str(path),
            f"pcb-{path.stem}",
        )
        for index, path in enumerate(boards)
    ]
    for path in sorted(photos.glob("*.jpg")):
        frames.append(
            SourceFrame(
                "photo-1",
                path.read_bytes(),
                "image/jpeg",
                str(path),
                f"photo-{path.stem}",
            )
        )
    assert len(frames) == REAL_FRAME_COUNT
    return frames


_SIMULATED: list[SourceFrame] = []


def simulated_frames(line: str) -> list[SourceFrame]:
    """Simulator frames on cameras cam-1 and cam-2, rendered once per module."""
    if not _SIMULATED:
        _SIMULATED.extend(
            simulator_frames("sim", SIMULATED_FRAME_COUNT, cameras=2, seed=7)
        )
    return list(_SIMULATED)


def sent_record(frame: SourceFrame, frame_id: str, captured_at_ns: int) -> SentFrame:
    return SentFrame(
        frame_id,
        frame.camera_id,
        frame.content_type,
        hashlib.sha256(frame.payload).hexdigest(),
        captured_at_ns,
    )


def read_topic(
    settings: Settings, topic: str, count: int, timeout_s: float = 60.0
) -> list[Any]:
    """Read ``count`` messages of every partition of ``topic`` from the beginning."""
    consumer = Consumer(consumer_config(settings, f"test-{uuid.uuid4().hex}"))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
        )
        messages: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(messages) < count and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=1.0):
                assert message.error() is None, message.error()
                messages.append(message)
        # One more poll, so that a duplicate or stray message would show.
        messages.extend(consumer.consume(500, timeout=1.0))
        return messages
    finally:
        consumer.close()


def check_landed(
    settings: Settings,
    line: str,
    sent: list[SentFrame],
    acks: dict[str, dict[str, Any]],
) -> None:
    """Check every sent frame against its message in ``frames.<line>`` and its ack."""
    topic = frames_topic(line)
    messages = read_topic(settings, topic, len(sent))
    assert len(messages) == len(sent)
    assert len(acks) == len(sent)
    by_frame_id = {}
    for message in messages:
        headers = FrameHeaders.from_kafka(message.headers())
        by_frame_id[headers.frame_id] = (message, headers)
    assert len(by_frame_id) == len(sent)
    last_offset: dict[str, tuple[int, int]] = {}
    for frame in sent:
        message, headers = by_frame_id[frame.frame_id]
        ack = acks[frame.frame_id]
        assert (message.partition(), message.offset()) == (
            ack["partition"],
            ack["offset"],
        )
        assert ack["topic"] == topic
        assert ack["position"] == f"{topic}[{message.partition()}]@{message.offset()}"
        assert headers.line_id == line
        assert headers.camera_id == frame.camera_id
        assert headers.content_type == frame.content_type
        assert headers.captured_at_ns == frame.captured_at_ns
        assert ack["captured_at"] == frame.captured_at_ns
        assert message.key() == frame.camera_id.encode()
        assert message.timestamp()[1] == frame.captured_at_ns // 1_000_000
        assert hashlib.sha256(message.value()).hexdigest() == frame.sha256
        # One camera: one partition, offsets rising in the order of sending.
        if frame.camera_id in last_offset:
            partition, offset = last_offset[frame.camera_id]
            assert message.partition() == partition
            assert message.offset() > offset
        last_offset[frame.camera_id] = (message.partition(), message.offset())


# HTTP


def post_frames(
    url: str, line: str, frames: list[SourceFrame]
) -> tuple[list[SentFrame], dict[str, dict[str, Any]]]:
    """Post each camera's frames in order: a thread per camera, one reply at a time."""
    sent: list[SentFrame] = []
    acks: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    by_camera: dict[str, list[SourceFrame]] = {}
    for frame in frames:
        by_camera.setdefault(frame.camera_id, []).append(frame)

    def post_camera(camera_frames: list[SourceFrame]) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for frame in camera_frames:
                frame_id = frame.frame_id or uuid.uuid4().hex
                captured_at_ns = time.time_ns()
                response = client.post(
                    f"/v1/lines/{line}/frames",
                    content=frame.payload,
                    headers={
                        "Content-Type": frame.content_type,
                        "Camera-Id": frame.camera_id,
                        "Captured-At": str(captured_at_ns),
                        "Frame-Id": frame_id,
                    },
                )
                if response.status_code != 202:
                    failures.append(
                        f"{frame.label}: {response.status_code} {response.text}"
                    )
                    return
                acks[frame_id] = response.json()
                sent.append(sent_record(frame, frame_id, captured_at_ns))

    threads = [
        threading.Thread(target=post_camera, args=(group,))
        for group in by_camera.values()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    # Sorting keeps each camera's order, the only order check_landed compares.
    sent.sort(key=lambda record: (record.camera_id, record.captured_at_ns))
    return sent, acks


@pytest.mark.data
def test_http_real_frames_land_in_order(
    start_edge: EdgeFactory, line_id: str, deeppcb: Path, photos: Path
) -> None:
    url, settings = start_edge()
    sent, acks = post_frames(url, line_id, real_frames(deeppcb, photos))
    assert len(sent) == REAL_FRAME_COUNT
    check_landed(settings, line_id, sent, acks)
    metrics = httpx.get(f"{url}/metrics").text
    assert (
        f'faultline_ingest_frames_accepted_total{{line="{line_id}"}} '
        f"{REAL_FRAME_COUNT}.0" in metrics
    )
    assert (
        f'faultline_ingest_produce_seconds_count{{line="{line_id}"}} '
        f"{REAL_FRAME_COUNT}.0" in metrics
    )


def test_http_simulated_frames_land_in_order(
    start_edge: EdgeFactory, line_id: str
) -> None:
    url, settings = start_edge()
    sent, acks = post_frames(url, line_id, simulated_frames(line_id))
    check_landed(settings, line_id, sent, acks)


def test_http_query_parameters_accepted(start_edge: EdgeFactory, line_id: str) -> None:
    url, settings = start_edge()
    frame = simulated_frames(line_id)[0]
    captured_at_ns = time.time_ns()
    response = httpx.post(
        f"{url}/v1/lines/{line_id}/frames",
        params={
            "camera_id": "cam-q",
            "captured_at": str(captured_at_ns),
            "frame_id": "q-1",
        },
        content=frame.payload,
        headers={"Content-Type": frame.content_type},
    )
    assert response.status_code == 202, response.text
    ack = response.json()
    assert ack["frame_id"] == "q-1"
    assert ack["camera_id"] == "cam-q"
    assert ack["line"] == line_id
    check_landed(
        settings,
        line_id,
        [
            sent_record(
                SourceFrame("cam-q", frame.payload, frame.content_type, ""),
                "q-1",
                captured_at_ns,
            )
        ],
        {"q-1": ack},
    )


# WebSocket


async def stream_frames(
    url: str, line: str, frames: list[SourceFrame]
) -> tuple[list[SentFrame], dict[str, dict[str, Any]], dict[str, int]]:
    """Send all frames on one WebSocket within the granted credit; collect the acks."""
    import json

    from websockets.asyncio.client import connect

    sent: list[SentFrame] = []
    acks: dict[str, dict[str, Any]] = {}
    counts = {"throttle": 0, "error": 0}
    in_flight: dict[int, str] = {}
    async with connect(
        url.replace("http", "ws", 1) + f"/v1/lines/{line}/stream", compression=None
    ) as websocket:
        greeting = json.loads(await websocket.recv())
        assert greeting == {"type": "credit", "credit": 32}
        credit = greeting["credit"]
        next_frame = 0
        while next_frame < len(frames) or in_flight:
            while next_frame < len(frames) and len(in_flight) < credit:
                frame = frames[next_frame]
                frame_id = frame.frame_id or f"sim-{next_frame}"
                captured_at_ns = time.time_ns()
                header = {
                    "seq": next_frame,
                    "camera_id": frame.camera_id,
                    "content_type": frame.content_type,
                    "captured_at": captured_at_ns,
                    "frame_id": frame_id,
                }
                await websocket.send(encode_envelope(header, frame.payload))
                sent.append(sent_record(frame, frame_id, captured_at_ns))
                in_flight[next_frame] = frame_id
                next_frame += 1
            reply = json.loads(await websocket.recv())
            if reply["type"] == "ack":
                acks[in_flight.pop(reply["seq"])] = reply
            else:
                counts[reply["type"]] += 1
                assert reply["type"] != "error", reply
    return sent, acks, counts


@pytest.mark.data
def test_ws_real_frames_land_in_order(
    start_edge: EdgeFactory, line_id: str, deeppcb: Path, photos: Path
) -> None:
    url, settings = start_edge()
    sent, acks, counts = asyncio.run(
        stream_frames(url, line_id, real_frames(deeppcb, photos))
    )
    assert counts == {"throttle": 0, "error": 0}
    check_landed(settings, line_id, sent, acks)


def test_ws_simulated_frames_land_in_order(
    start_edge: EdgeFactory, line_id: str
) -> None:
    url, settings = start_edge()
    sent, acks, counts = asyncio.run(
        stream_frames(url, line_id, simulated_frames(line_id))
    )
    assert counts == {"throttle": 0, "error": 0}
    check_landed(settings, line_id, sent, acks)


async def flood(url: str, line: str, frames: list[SourceFrame]) -> list[dict[str, Any]]:
    """Send every frame at once, ignoring the credit, and return all replies."""
    import json

    from websockets.asyncio.client import connect

    replies = []
    async with connect(
        url.replace("http", "ws", 1) + f"/v1/lines/{line}/stream", compression=None
    ) as websocket:
        assert json.loads(await websocket.recv())["type"] == "credit"
        for seq, frame in enumerate(frames):
            header = {
                "seq": seq,
                "camera_id": frame.camera_id,
                "content_type": frame.content_type,
            }
            await websocket.send(encode_envelope(header, frame.payload))
        while sum(1 for reply in replies if reply["type"] in ("ack", "error")) < len(
            frames
        ):
            replies.append(
                json.loads(await asyncio.wait_for(websocket.recv(), timeout=30))
            )
    return replies


def test_ws_credit_exceeded_throttles_not_drops(
    start_edge: EdgeFactory, line_id: str
) -> None:
    url, settings = start_edge(ingest_ws_credit=4)
    frames = simulated_frames(line_id)[:40]
    replies = asyncio.run(flood(url, line_id, frames))
    throttles = [reply for reply in replies if reply["type"] == "throttle"]
    acks = [reply for reply in replies if reply["type"] == "ack"]
    assert throttles, "a client past its credit must be told"
    assert all(reply["credit"] == 4 for reply in throttles)
    assert sorted(reply["seq"] for reply in acks) == list(range(40))
    messages = read_topic(settings, frames_topic(line_id), 40)
    assert len(messages) == 40
    for ack in acks:
        assert ack["frame_id"] in {
            FrameHeaders.from_kafka(m.headers()).frame_id for m in messages
        }
    metrics = httpx.get(f"{url}/metrics").text
    assert (
        f'faultline_ingest_ws_credit_exceeded_total{{line="{line_id}"}} '
        f"{len(throttles)}.0" in metrics
    )


def test_ws_bad_frames_answered_connection_kept(
    start_edge: EdgeFactory, line_id: str
) -> None:
    url, settings = start_edge(max_message_bytes=256 * 1024)
    good = simulated_frames(line_id)[0]

    async def exchange() -> list[dict[str, Any]]:
        import json

        from websockets.asyncio.client import connect

        valid = {"camera_id": "cam-1", "content_type": good.content_type}
        messages: list[bytes | str] = [
            "a text message",
            b"\x00\x01",
            encode_envelope(
                {"seq": 2, "camera_id": "../cam", "content_type": good.content_type},
                good.payload,
            ),
            encode_envelope(
                {"seq": 3, "camera_id": "cam-1", "content_type": "image/gif"},
                good.payload,
            ),
            encode_envelope(
                {"seq": 4, **valid, "content_type": "image/png"}, good.payload
            ),
            encode_envelope({"seq": 5, **valid}, b"\xff\xd8\xff" + bytes(256 * 1024)),
            encode_envelope(
                {"seq": 6, **valid, "captured_at": 1738310400}, good.payload
            ),
            encode_envelope({"seq": 7, **valid}, good.payload),
        ]
        replies = []
        async with connect(
            url.replace("http", "ws", 1) + f"/v1/lines/{line_id}/stream"
        ) as websocket:
            await websocket.recv()
            for message in messages:
                await websocket.send(message)
                replies.append(
                    json.loads(await asyncio.wait_for(websocket.recv(), timeout=30))
                )
            # Past the frame limit plus the envelope, uvicorn closes with 1009.
            await websocket.send(
                encode_envelope({"seq": 8, **valid}, bytes(300 * 1024))
            )
            with pytest.raises(ConnectionClosedError) as closed:
                await asyncio.wait_for(websocket.recv(), timeout=30)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1009
        return replies

    replies = asyncio.run(exchange())
    statuses = [(reply["type"], reply.get("status"), reply["seq"]) for reply in replies]
    assert statuses == [
        ("error", 422, 0),
        ("error", 422, 1),
        ("error", 422, 2),
        ("error", 415, 3),
        ("error", 415, 4),
        ("error", 413, 5),
        ("error", 422, 6),
        ("ack", None, 7),
    ]
    assert replies[5]["value"] == 3 + 256 * 1024
    assert replies[5]["limit"] == 256 * 1024
    assert replies[3]["error"] == "unsupported-media-type"
    assert replies[4]["error"] == "not-an-image"
    assert len(read_topic(settings, frames_topic(line_id), 1)) == 1


# Batch


def batch_part(
    frame: SourceFrame,
    camera_id: str | None = None,
    frame_id: str | None = None,
    content_type: str | None = None,
) -> tuple[str, tuple[str, bytes, str, dict[str, str]]]:
    headers = {}
    if camera_id is not None:
        headers["Camera-Id"] = camera_id
    if frame_id is not None:
        headers["Frame-Id"] = frame_id
    return (
        "frame",
        (
            f"{frame_id or 'frame'}.jpg",
            frame.payload,
            content_type or frame.content_type,
            headers,
        ),
    )


def test_batch_reports_each_item(start_edge: EdgeFactory, line_id: str) -> None:
    url, settings = start_edge()
    frames = simulated_frames(line_id)[:6]
    captured_at_ns = time.time_ns()

    parts = [
        batch_part(frames[0], "cam-a", "b-0"),
        batch_part(frames[1], "cam-b", "b-1"),
        batch_part(frames[2], None, "b-2"),  # the request's Camera-Id applies
        batch_part(frames[3], "cam-a", "b-3", content_type="image/png"),
        batch_part(frames[4], "../cam", "b-4"),
        batch_part(frames[5], "cam-a", "b-5"),
    ]
    response = httpx.post(
        f"{url}/v1/lines/{line_id}/frames:batch",
        files=parts,
        headers={"Camera-Id": "cam-b", "Captured-At": str(captured_at_ns)},
        timeout=30,
    )

    assert response.status_code == 207, response.text
    body = response.json()
    assert body["accepted"] == 4
    assert body["rejected"] == 2
    items = body["items"]
    assert [item["index"] for item in items] == list(range(6))
    assert [item["status"] for item in items] == [202, 202, 202, 415, 422, 202]
    assert items[2]["camera_id"] == "cam-b"
    assert items[3]["error"] == "not-an-image"
    assert "part 4 Camera-Id" in items[4]["message"]

    # The accepted frames landed at the acked positions, in per-camera order.
    accepted = [(0, "cam-a"), (1, "cam-b"), (2, "cam-b"), (5, "cam-a")]
    sent = [
        sent_record(
            SourceFrame(camera, frames[i].payload, frames[i].content_type, ""),
            f"b-{i}",
            captured_at_ns,
        )
        for i, camera in accepted
    ]
    acks = {f"b-{i}": items[i] for i, _ in accepted}
    check_landed(settings, line_id, sent, acks)


def test_batch_all_accepted_202(start_edge: EdgeFactory, line_id: str) -> None:
    url, settings = start_edge()
    frames = simulated_frames(line_id)[:3]
    parts = [batch_part(frame, "cam-1", f"a-{i}") for i, frame in enumerate(frames)]
    response = httpx.post(
        f"{url}/v1/lines/{line_id}/frames:batch", files=parts, timeout=30
    )
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 3
    offsets = [item["offset"] for item in response.json()["items"]]
    assert offsets == sorted(offsets)


def test_batch_over_max_frames_413(start_edge: EdgeFactory, line_id: str) -> None:
    url, settings = start_edge(ingest_batch_max_frames=3)
    frames = simulated_frames(line_id)[:5]
    parts = [batch_part(frame, "cam-1", f"m-{i}") for i, frame in enumerate(frames)]
    response = httpx.post(
        f"{url}/v1/lines/{line_id}/frames:batch", files=parts, timeout=30
    )
    assert response.status_code == 207
    items = response.json()["items"]
    assert [item["status"] for item in items] == [202, 202, 202, 413]
    assert items[3]["error"] == "batch-too-large"
    assert items[3]["limit"] == 3
    assert len(read_topic(settings, frames_topic(line_id), 3)) == 3


def test_batch_part_over_size_413(start_edge: EdgeFactory, line_id: str) -> None:
    url, settings = start_edge(max_message_bytes=64 * 1024)
    small = SourceFrame(
        "cam-1", simulated_frames(line_id)[0].payload[:0], "image/jpeg", ""
    )
    big = SourceFrame(
        "cam-1", b"\xff\xd8\xff" + bytes(100 * 1024) + b"\xff\xd9", "image/jpeg", ""
    )
    response = httpx.post(
        f"{url}/v1/lines/{line_id}/frames:batch",
        files=[batch_part(big, "cam-1"), batch_part(small, "cam-1")],
        timeout=30,
    )
    assert response.status_code == 207
    items = response.json()["items"]
    assert items[0]["status"] == 413
    assert items[0]["value"] == len(big.payload)
    assert items[0]["limit"] == 64 * 1024
    assert items[1]["status"] == 415
