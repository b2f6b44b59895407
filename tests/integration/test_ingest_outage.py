"""The ingest edge through a broker outage: 503 within 2 s, readiness, recovery.

The module starts its own broker on free ports under a temporary home, so
stopping it leaves the session's broker alone. A camera that starts during
the outage must get every frame through once the broker is back.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from ingest.camera import CameraOptions, CameraReport, run_camera
from ingest.edge import running_edge
from ingest.feed import simulator_frames
from ingest.stream import encode_envelope
from pipeline.kafka import ensure_line_topics
from pipeline.launcher import LocalKafka
from pipeline.settings import Settings
from tests.conftest import free_port
from tests.integration.test_ingest_frames import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_REPLY_MAX_S = 2.0
RECOVERY_TIMEOUT_S = 90.0
CAMERA_FRAMES = 10


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    settings = Settings(
        home=tmp_path / "broker",
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
    )
    kafka = LocalKafka(settings)
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


def wait_for_readiness(client: httpx.Client, ready: bool, timeout_s: float) -> float:
    """Poll /readyz until it reports ``ready``; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if (client.get("/readyz").status_code == 200) == ready:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"/readyz did not report ready={ready} within {timeout_s} s")


async def stream_one_frame(url: str, line: str, payload: bytes) -> dict[str, object]:
    async with connect(
        url.replace("http", "ws", 1) + f"/v1/lines/{line}/stream"
    ) as websocket:
        await websocket.recv()
        header = {"seq": 1, "camera_id": "cam-ws", "content_type": "image/jpeg"}
        await websocket.send(encode_envelope(header, payload))
        return json.loads(await asyncio.wait_for(websocket.recv(), timeout=10))


def test_broker_outage_503_then_recovery(
    own_broker: LocalKafka, line_id: str, tmp_path: Path
) -> None:
    settings = Settings(
        bootstrap_servers=own_broker.bootstrap,
        home=tmp_path,
        ingest_broker_check_interval_s=0.5,
    )
    ensure_line_topics(settings, line_id)
    frames = list(simulator_frames("sim", CAMERA_FRAMES + 2, cameras=1))
    payload = frames[0].payload
    headers = {"Content-Type": "image/jpeg", "Camera-Id": "cam-1"}
    frame_path = f"/v1/lines/{line_id}/frames"

    with (
        running_edge(settings) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        before = client.post(frame_path, content=payload, headers=headers)
        assert before.status_code == 202, before.text
        assert client.get("/readyz").status_code == 200

        own_broker.stop()
        assert (
            wait_for_readiness(client, ready=False, timeout_s=OUTAGE_REPLY_MAX_S)
            < OUTAGE_REPLY_MAX_S
        )
        started = time.monotonic()
        during = client.post(frame_path, content=payload, headers=headers)
        assert time.monotonic() - started < OUTAGE_REPLY_MAX_S
        assert during.status_code == 503
        assert during.json()["error"] == "broker-unavailable"
        assert during.headers["Retry-After"] == str(settings.ingest_retry_after_s)
        readiness = client.get("/readyz")
        assert readiness.json() == {"ready": False, "broker": "unreachable"}
        assert readiness.headers["Retry-After"] == str(settings.ingest_retry_after_s)
        assert client.get("/healthz").status_code == 200  # alive, only not ready
        assert "faultline_ingest_broker_reachable 0.0" in client.get("/metrics").text
        streamed = asyncio.run(stream_one_frame(url, line_id, payload))
        assert streamed["type"] == "error"
        assert streamed["status"] == 503
        batch = client.post(
            f"/v1/lines/{line_id}/frames:batch",
            files=[("frame", ("a.jpg", payload, "image/jpeg"))],
            headers={"Camera-Id": "cam-1"},
        )
        assert batch.status_code == 503

        # A camera that starts during the outage retries until the broker returns.
        report_box: list[CameraReport] = []
        options = CameraOptions(
            line=line_id,
            via="http",
            url=url,
            fps=0,
            max_retries=30,
            backoff_s=0.2,
            max_backoff_s=2.0,
            progress=False,
        )
        camera = threading.Thread(
            target=lambda: report_box.append(
                run_camera(settings, options, iter(frames[2:]))
            ),
            daemon=True,
        )
        camera.start()

        own_broker.start()
        wait_for_readiness(client, ready=True, timeout_s=RECOVERY_TIMEOUT_S)
        after = client.post(frame_path, content=payload, headers=headers)
        assert after.status_code == 202, after.text
        assert after.json()["partition"] == before.json()["partition"]
        assert after.json()["offset"] > before.json()["offset"]
        camera.join(timeout=RECOVERY_TIMEOUT_S)
        assert not camera.is_alive()

    report = report_box[0]
    assert report.acked == CAMERA_FRAMES
    assert report.failed == 0
    assert report.retries > 0
    # Frames that got 503 were never produced, so only the acked ones are there.
    messages = read_topic(settings, f"frames.{line_id}", 2 + CAMERA_FRAMES)
    assert len(messages) == 2 + CAMERA_FRAMES
