"""Run ``faultline serve`` against the test broker and feed it results.

Results are synthetic ``ResultRecord``s produced straight to
``results.<line>``, so no inference worker is needed. Frames come from the
line simulator and go to ``frames.<line>`` with the real header contract, so
frame fetch has real bytes to return.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from confluent_kafka import Producer

from ingest.simulator import LineSimulator, SimulatedShot
from pipeline.kafka import ensure_line_topics, producer_config
from pipeline.settings import Settings
from pipeline.topics import frames_topic, results_topic
from schemas import Detection, FrameHeaders, ResultRecord, StageLatency
from tests.conftest import Processes, free_port

START_TIMEOUT_S = 90.0


class ResultsEdge:
    """``faultline serve`` for some lines, in its own process with its own chDB."""

    def __init__(
        self,
        processes: Processes,
        bootstrap: str,
        lines: Sequence[str],
        home: Path,
        extra_args: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
        name: str = "serve",
    ) -> None:
        self.processes = processes
        self.name = name
        self.lines = list(lines)
        self.port = free_port()
        self.settings = Settings(bootstrap_servers=bootstrap, home=home)
        self.args = ["serve", *extra_args]
        self.env = {
            "FAULTLINE_BOOTSTRAP_SERVERS": bootstrap,
            "FAULTLINE_HOME": str(home),
            "FAULTLINE_LINES": ",".join(self.lines),
            "FAULTLINE_QUERY_PORT": str(self.port),
            "FAULTLINE_SINK_GROUP_ID": f"sink-{uuid.uuid4().hex[:8]}",
            "FAULTLINE_METADATA_MAX_AGE_S": "1",
            "FAULTLINE_SINK_BATCH_TIMEOUT_S": "0.3",
            **(extra_env or {}),
        }
        for line in self.lines:
            ensure_line_topics(self.settings, line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/results"

    def start(self) -> None:
        """Start the process and wait until /readyz returns 200."""
        self.processes.start(self.name, self.args, self.env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            process = self.processes.running[self.name]
            if process.poll() is not None:
                raise AssertionError(
                    f"faultline serve exited with {process.returncode}:\n"
                    f"{self.log()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"faultline serve was not ready:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.processes.log(self.name)

    def metric(self, name: str, labels: str = "") -> float:
        """Return one sample of /metrics, 0 when it is absent."""
        body = httpx.get(f"{self.url}/metrics", timeout=10).text
        wanted = f"{name}{{{labels}}}" if labels else name
        for row in body.splitlines():
            if row.startswith(wanted + " "):
                return float(row.split()[-1])
        return 0.0


def result_record(
    line: str,
    frame_id: str,
    offset: int,
    *,
    partition: int = 0,
    detections: Sequence[Detection] = (),
    camera_id: str = "cam-1",
    captured_at_ns: int | None = None,
    inferred_at_ns: int | None = None,
    model_name: str = "pcb-test",
    model_version: str = "1.0",
    run_id: str = "",
    width: int = 640,
    height: int = 640,
    latency: StageLatency | None = None,
) -> ResultRecord:
    """Build a result; the verdict is fail when there are detections."""
    now = time.time_ns()
    captured = captured_at_ns if captured_at_ns is not None else now
    return ResultRecord(
        frame_id=frame_id,
        line_id=line,
        camera_id=camera_id,
        captured_at_ns=captured,
        ingested_at_ns=captured,
        inferred_at_ns=inferred_at_ns if inferred_at_ns is not None else now,
        model_name=model_name,
        model_version=model_version,
        image_width=width,
        image_height=height,
        detections=tuple(detections),
        verdict="fail" if detections else "pass",
        latency=latency or StageLatency(0.01, 0.002, 0.03, 0.05, 8),
        source_topic=frames_topic(line),
        source_partition=partition,
        source_offset=offset,
        run_id=run_id,
    )


class ResultProducer:
    """One idempotent producer for results; send() waits for the broker's acks."""

    def __init__(self, settings: Settings) -> None:
        self._producer = Producer(producer_config(settings))
        self._failures: list[str] = []

    def _delivered(self, error, message) -> None:  # type: ignore[no-untyped-def]
        if error is not None:
            self._failures.append(str(error))

    def send(self, records: Sequence[ResultRecord]) -> None:
        for record in records:
            while True:
                try:
                    self._producer.produce(
                        results_topic(record.line_id),
                        key=record.camera_id.encode(),
                        value=record.to_json(),
                        on_delivery=self._delivered,
                    )
                    break
                except BufferError:
                    self._producer.poll(0.1)
            self._producer.poll(0)
        remaining = self._producer.flush(30)
        assert remaining == 0, f"{remaining} results were not acknowledged"
        assert not self._failures, f"producing results failed: {self._failures[:3]}"


def produce_results(settings: Settings, records: Sequence[ResultRecord]) -> None:
    """Produce records to their results.<line> topics and wait for the acks."""
    ResultProducer(settings).send(records)


@dataclass(frozen=True)
class ProducedFrame:
    """A simulator frame as stored on frames.<line>, with its position."""

    shot: SimulatedShot
    frame_id: str
    partition: int
    offset: int
    sha256: str


def produce_frames(
    settings: Settings, line: str, count: int, seed: int = 0, fmt: str = "jpeg"
) -> list[ProducedFrame]:
    """Produce ``count`` simulator frames to frames.<line>; return their positions."""
    producer = Producer(producer_config(settings))
    positions: dict[str, tuple[int, int]] = {}
    failures: list[str] = []
    shots = {}
    for shot in LineSimulator(line, cameras=2, seed=seed, fmt=fmt).take(count):
        headers = FrameHeaders.new(line, shot.camera_id, shot.content_type)
        shots[headers.frame_id] = shot

        def delivered(error, message, frame_id=headers.frame_id) -> None:  # type: ignore[no-untyped-def]
            if error is not None:
                failures.append(str(error))
            else:
                positions[frame_id] = (message.partition(), message.offset())

        producer.produce(
            frames_topic(line),
            key=shot.camera_id.encode(),
            value=shot.payload,
            headers=headers.to_kafka(),
            timestamp=headers.captured_at_ns // 1_000_000,
            on_delivery=delivered,
        )
        producer.poll(0)
    assert producer.flush(30) == 0, "frames were not acknowledged"
    assert not failures, f"producing frames failed: {failures[:3]}"
    return [
        ProducedFrame(
            shot=shot,
            frame_id=frame_id,
            partition=positions[frame_id][0],
            offset=positions[frame_id][1],
            sha256=hashlib.sha256(shot.payload).hexdigest(),
        )
        for frame_id, shot in shots.items()
    ]


def result_of_frame(
    line: str, frame: ProducedFrame, **overrides: object
) -> ResultRecord:
    """Build the result a perfect detector would give: the simulator's ground truth."""
    detections = [
        Detection(
            truth.class_id,
            truth.class_name,
            0.9,
            truth.x1,
            truth.y1,
            truth.x2,
            truth.y2,
        )
        for truth in frame.shot.frame.defects
    ]
    return result_record(
        line,
        frame.frame_id,
        frame.offset,
        partition=frame.partition,
        detections=detections,
        camera_id=frame.shot.camera_id,
        **overrides,  # type: ignore[arg-type]
    )
