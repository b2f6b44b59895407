"""``faultline camera`` and ``faultline ingest`` against the real broker.

The camera runs as the command line runs it, once per transport, with the
token from FAULTLINE_INGEST_TOKEN; the edge runs once in this process and
once as ``faultline ingest`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from ingest.camera import CameraOptions, run_camera, video_frames
from ingest.edge import running_edge
from pipeline.kafka import ensure_line_topics
from pipeline.settings import Settings
from schemas.images import sniff_content_type
from schemas.records import FrameHeaders
from tests.conftest import REPO_ROOT, Processes, free_port
from tests.integration.test_ingest_frames import read_topic
from tests.unit.test_ingest_camera import write_video

pytestmark = pytest.mark.integration

TOKEN = "secret-camera-token"
TOKENS = {
    "tokens": [{"token": TOKEN, "roles": ["ingest"], "lines": ["*"], "name": "cameras"}]
}
FRAMES_PER_RUN = 20


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_camera_cli_each_transport(
    kafka_bootstrap: str, line_id: str, tmp_path: Path
) -> None:
    settings = Settings(
        bootstrap_servers=kafka_bootstrap,
        home=tmp_path,
        tokens=SecretStr(json.dumps(TOKENS)),
    )
    ensure_line_topics(settings, line_id)
    with running_edge(settings) as url:
        for via in ("http", "ws", "kafka"):
            result = run_cli(
                ["camera", "--line", line_id, "--source", "simulator",
                 "--count", str(FRAMES_PER_RUN), "--fps", "0", "--via", via,
                 "--url", url, "--bootstrap-servers", kafka_bootstrap,
                 "--no-progress", "--log-level", "WARNING"],
                {"FAULTLINE_INGEST_TOKEN": TOKEN},
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert (
                f"sent {FRAMES_PER_RUN}, acked {FRAMES_PER_RUN}, failed 0"
                in result.stdout
            )
            assert TOKEN not in result.stdout + result.stderr
        without_token = run_cli(
            ["camera", "--line", line_id, "--source", "simulator", "--count", "1",
             "--fps", "0", "--via", "http", "--url", url, "--no-progress"],
            {"FAULTLINE_INGEST_TOKEN": ""},
        )  # fmt: skip
    assert without_token.returncode == 2
    assert "401" in without_token.stderr
    messages = read_topic(settings, f"frames.{line_id}", 3 * FRAMES_PER_RUN)
    assert len(messages) == 3 * FRAMES_PER_RUN


def test_camera_video_over_ws(
    kafka_bootstrap: str, line_id: str, tmp_path: Path
) -> None:
    settings = Settings(bootstrap_servers=kafka_bootstrap, home=tmp_path)
    ensure_line_topics(settings, line_id)
    video = tmp_path / "line.avi"
    write_video(video, 30)
    acks: list[dict[str, object]] = []
    with running_edge(settings) as url:
        options = CameraOptions(line=line_id, via="ws", url=url, fps=0, progress=False)
        report = run_camera(
            settings,
            options,
            video_frames(video, "cam-video", quality=85),
            on_ack=acks.append,
        )
    assert report.sent == 30
    assert report.acked == 30
    assert report.failed == 0
    offsets = [ack["offset"] for ack in acks]
    assert offsets == sorted(offsets)
    assert len({ack["partition"] for ack in acks}) == 1
    messages = read_topic(settings, f"frames.{line_id}", 30)
    assert len(messages) == 30
    for message in messages:
        assert sniff_content_type(message.value()) == "image/jpeg"
        assert FrameHeaders.from_kafka(message.headers()).camera_id == "cam-video"


def test_ingest_command_serves(
    kafka_bootstrap: str, line_id: str, tmp_path: Path, processes: Processes
) -> None:
    settings = Settings(bootstrap_servers=kafka_bootstrap, home=tmp_path)
    ensure_line_topics(settings, line_id)
    port = free_port()
    processes.start(
        "ingest",
        [
            "ingest",
            "--port",
            str(port),
            "--bootstrap-servers",
            kafka_bootstrap,
            "--home",
            str(tmp_path),
        ],
        {},
    )
    url = f"http://127.0.0.1:{port}"

    deadline = time.monotonic() + 60
    ready = False
    while not ready and time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{url}/readyz").status_code == 200
        except httpx.TransportError:
            time.sleep(0.2)
    assert ready, processes.log("ingest")

    payload = next(video_frames_for_test(tmp_path)).payload
    response = httpx.post(
        f"{url}/v1/lines/{line_id}/frames",
        content=payload,
        headers={"Content-Type": "image/jpeg", "Camera-Id": "cam-1"},
    )
    assert response.status_code == 202, response.text

    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again.
    assert processes.stop("ingest") in (0, -15)
    assert "ingest edge stopped" in processes.log("ingest")


def video_frames_for_test(tmp_path: Path):  # type: ignore[no-untyped-def]
    video = tmp_path / "one.avi"
    write_video(video, 1)
    return video_frames(video, "cam-1")
