"""Produce frames straight to ``frames.<line>``: a folder or the simulator.

``faultline feed`` is the simplest source: it replays image files in name
order (or simulator frames) at a steady rate, each with the frame header
contract, keyed by camera id, timestamped with its capture time. It returns
only after the broker acknowledged every frame or reported it failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import BrokerError, ConfigError
from pipeline.kafka import producer_config
from pipeline.settings import Settings
from pipeline.topics import frames_topic
from schemas import FrameHeaders
from schemas.images import sniff_content_type

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp"}


@dataclass(frozen=True)
class SourceFrame:
    camera_id: str
    payload: bytes
    content_type: str
    label: str  # file path or simulator sequence, for reports
    frame_id: str | None = None


@dataclass
class FeedReport:
    sent: int = 0
    acked: int = 0
    failed: int = 0
    frame_ids: dict[str, str] = field(default_factory=dict)  # frame id -> label
    errors: list[str] = field(default_factory=list)


def folder_frames(folder: Path, camera_id: str = "cam-1", limit: int | None = None) -> Iterator[SourceFrame]:
    """Image files of ``folder`` in name order; other files are skipped."""
    if not folder.is_dir():
        raise ConfigError(f"--source {str(folder)!r} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(
            f"--source {str(folder)!r} has no .jpg, .jpeg, .png or .bmp files"
        )
    for path in files[:limit]:
        payload = path.read_bytes()
        content_type = sniff_content_type(payload) or IMAGE_SUFFIXES[path.suffix.lower()]
        yield SourceFrame(camera_id, payload, content_type, str(path), frame_id=path.stem)


def simulator_frames(line: str, count: int, cameras: int = 2, seed: int = 0) -> Iterator[SourceFrame]:
    from ingest.simulator import LineSimulator

    for shot in LineSimulator(line, cameras=cameras, seed=seed).take(count):
        yield SourceFrame(
            shot.camera_id, shot.payload, shot.content_type, f"sim:{line}:{shot.sequence}"
        )


class FrameProducer:
    """An idempotent producer of frame messages that waits for acks."""

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import Producer

        self.settings = settings
        self._producer = Producer(producer_config(settings))

    def send(self, line: str, frame: SourceFrame, report: FeedReport, captured_at_ns: int | None = None) -> str:
        if len(frame.payload) > self.settings.max_message_bytes:
            raise ConfigError(
                f"frame {frame.label} is {len(frame.payload)} bytes; the limit is "
                f"{self.settings.max_message_bytes} (FAULTLINE_MAX_MESSAGE_BYTES)"
            )
        headers = FrameHeaders.new(
            line, frame.camera_id, frame.content_type, captured_at_ns=captured_at_ns,
            frame_id=frame.frame_id,
        )

        def delivered(error, message) -> None:  # type: ignore[no-untyped-def]
            if error is None:
                report.acked += 1
            else:
                report.failed += 1
                report.errors.append(f"{frame.label}: {error}")

        while True:
            try:
                self._producer.produce(
                    frames_topic(line),
                    key=frame.camera_id.encode(),
                    value=frame.payload,
                    headers=headers.to_kafka(),
                    timestamp=headers.captured_at_ns // 1_000_000,
                    on_delivery=delivered,
                )
                break
            except BufferError:
                self._producer.poll(0.1)  # local queue full: serve callbacks, retry
        self._producer.poll(0)
        report.sent += 1
        report.frame_ids[headers.frame_id] = frame.label
        return headers.frame_id

    def flush(self, timeout_s: float = 60.0) -> None:
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise BrokerError(
                f"{remaining} frames were not acknowledged within {timeout_s:.0f} s; "
                f"is Kafka at {self.settings.bootstrap_servers} up?"
            )


def feed(
    settings: Settings,
    line: str,
    frames: Iterator[SourceFrame],
    fps: float = 0.0,
    progress: bool = False,
) -> FeedReport:
    """Produce ``frames`` to ``frames.<line>`` at ``fps`` (0 = as fast as acked)."""
    frames_topic(line)  # validates the line id before anything is sent
    producer = FrameProducer(settings)
    report = FeedReport()
    interval = 1.0 / fps if fps > 0 else 0.0
    next_at = time.monotonic()
    try:
        for frame in frames:
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += interval
            try:
                producer.send(line, frame, report)
            except ConfigError as exc:
                # One oversize file must not stop the frames around it.
                report.failed += 1
                report.errors.append(str(exc))
                log.warning("skipped %s: %s", frame.label, exc)
                continue
            if progress and report.sent % 50 == 0:
                print(f"  {line}: sent {report.sent}, acked {report.acked}", flush=True)
    finally:
        # Frames already handed to the producer are delivered (or reported
        # failed) even when a later frame raises.
        producer.flush()
    log.info("fed %d frames to %s: %d acked, %d failed", report.sent, frames_topic(line), report.acked, report.failed)
    return report
