"""``faultline camera``: a frame source sending at a steady rate to one line.

Sources: a folder of images (name order), a video file (each frame JPEG
encoded at ``quality``) or the built-in simulator. Transports:

- ``http`` posts one frame at a time and waits for its reply, so one
  camera's frames keep their order.
- ``ws`` streams over the edge's WebSocket and keeps up to the server's
  credit of frames in flight.
- ``kafka`` produces straight to ``frames.<line>`` (``ingest.feed``).

A 429 or 503 reply, a refused connection and a lost WebSocket are retried
with exponential backoff (never shorter than the edge's Retry-After), up to
``max_retries`` times per frame. Other rejections count as failed and are not
retried. A frame retried over WebSocket can land after frames sent behind
it, and a frame in flight when a WebSocket drops is sent again, so it may be
stored twice (at least once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from ingest.feed import (
    FeedReport,
    FrameProducer,
    SourceFrame,
    folder_frames,
    simulator_frames,
)
from pipeline.errors import ConfigError, FaultlineError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

RETRY_STATUSES = (429, 503)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mjpeg", ".mjpg")
PROGRESS_INTERVAL_S = 0.2
PROGRESS_BAR_WIDTH = 24
MAX_ERRORS_KEPT = 100

Transport = Literal["http", "ws", "kafka"]
AckCallback = Callable[[dict[str, Any]], None]


class CameraError(FaultlineError):
    """The edge rejected the camera for good (auth, line) or stayed unreachable."""


@dataclass(frozen=True)
class CameraOptions:
    line: str
    via: Transport = "http"
    url: str = "http://127.0.0.1:8080"
    token: str = ""
    fps: float = 5.0
    max_retries: int = 8
    backoff_s: float = 0.25
    max_backoff_s: float = 30.0
    timeout_s: float = 30.0
    progress: bool = True


@dataclass
class CameraReport:
    """Counts of one run: ``sent`` counts frames, ``retries`` extra attempts."""

    total: int | None = None
    sent: int = 0
    acked: int = 0
    failed: int = 0
    retries: int = 0
    throttled: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, label: str, reason: str) -> None:
        self.failed += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{label}: {reason}")


# Sources


def video_frames(
    path: Path, camera_id: str, quality: int = 90, limit: int | None = None
) -> Iterator[SourceFrame]:
    """Frames of a video file, each JPEG-encoded at ``quality`` (1-100)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ConfigError(
            f"--source {str(path)!r} cannot be opened as a video by OpenCV"
        )
    try:
        index = 0
        while limit is None or index < limit:
            ok, image = capture.read()
            if not ok:
                return
            ok, encoded = cv2.imencode(
                ".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality]
            )
            if not ok:
                raise ConfigError(f"JPEG encoding of frame {index} of {path} failed")
            yield SourceFrame(
                camera_id, encoded.tobytes(), "image/jpeg", f"{path}#{index}"
            )
            index += 1
    finally:
        capture.release()


def video_frame_count(path: Path) -> int | None:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()
    return count if count > 0 else None


def camera_frames(
    source: str,
    line: str,
    camera_id: str = "cam-1",
    count: int | None = None,
    quality: int = 90,
    cameras: int = 2,
    seed: int = 0,
) -> tuple[Iterator[SourceFrame], int | None]:
    """Return the frames of ``source`` and their number when it is known."""
    if source == "simulator":
        total = count or 100
        return simulator_frames(line, total, cameras=cameras, seed=seed), total
    path = Path(source)
    if path.is_dir():
        files = [
            p
            for p in path.iterdir()
            if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp")
        ]
        total = len(files) if count is None else min(count, len(files))
        return folder_frames(path, camera_id=camera_id, limit=count), total
    if path.is_file():
        if not 1 <= quality <= 100:
            raise ConfigError(f"--quality {quality} is invalid: use 1 to 100")
        known = video_frame_count(path)
        total = known if count is None or known is None else min(count, known)
        return video_frames(path, camera_id, quality=quality, limit=count), total
    raise ConfigError(
        f"--source {source!r} is neither 'simulator', a folder of images "
        "nor a video file"
    )


# Pacing, backoff and progress


class Pacer:
    """Schedule of sends ``1 / fps`` seconds apart. With fps 0 there is no wait."""

    def __init__(self, fps: float) -> None:
        self.interval_s = 1.0 / fps if fps > 0 else 0.0
        self.next_at = time.monotonic()

    def delay_s(self) -> float:
        if not self.interval_s:
            return 0.0
        delay = self.next_at - time.monotonic()
        self.next_at = (
            max(self.next_at, time.monotonic() - self.interval_s) + self.interval_s
        )
        return max(delay, 0.0)


def backoff_delay_s(
    attempt: int, retry_after_s: float | None, base_s: float, cap_s: float
) -> float:
    """Return the wait before retry ``attempt`` (0-based), at least Retry-After.

    The wait doubles per attempt up to ``cap_s``, with jitter of up to half.
    """
    delay = min(cap_s, base_s * 2**attempt) * random.uniform(0.5, 1.0)
    return max(delay, retry_after_s or 0.0)


def retry_after_header(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None  # an HTTP date, so the backoff alone sets the wait


class ProgressLine:
    """One status line on a terminal, rewritten at most five times a second."""

    def __init__(
        self, label: str, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.started = time.monotonic()
        self.shown_at = 0.0

    def update(self, report: CameraReport, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (
            not force and now - self.shown_at < PROGRESS_INTERVAL_S
        ):
            return
        self.shown_at = now
        self.stream.write("\r" + self.render(report, now - self.started))
        self.stream.flush()

    def render(self, report: CameraReport, elapsed_s: float) -> str:
        done = report.acked + report.failed
        bar = ""
        if report.total:
            filled = int(PROGRESS_BAR_WIDTH * min(done / report.total, 1.0))
            blocks = "#" * filled + "-" * (PROGRESS_BAR_WIDTH - filled)
            bar = f"[{blocks}] {done}/{report.total} "
        rate = report.acked / elapsed_s if elapsed_s > 0 else 0.0
        return (
            f"{self.label} {bar}sent {report.sent} acked {report.acked} "
            f"failed {report.failed} retries {report.retries} {rate:.1f} fps"
        )

    def close(self, report: CameraReport) -> None:
        if self.enabled:
            self.update(report, force=True)
            self.stream.write("\n")
            self.stream.flush()


# HTTP


def _error_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} {response.text[:200]}"
    if isinstance(body, dict) and "message" in body:
        return f"{response.status_code} {body.get('error')}: {body['message']}"
    return f"{response.status_code} {str(body)[:200]}"


class HttpSender:
    """Sender that posts frames one at a time, retrying 429, 503 and lost links."""

    def __init__(
        self,
        options: CameraOptions,
        report: CameraReport,
        on_ack: AckCallback | None = None,
        client: Any = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import httpx

        self.options = options
        self.report = report
        self.on_ack = on_ack
        self.sleep = sleep
        headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
        self.client = client or httpx.Client(
            base_url=options.url, headers=headers, timeout=options.timeout_s
        )

    def send(self, frame: SourceFrame) -> None:
        import httpx

        path = f"/v1/lines/{self.options.line}/frames"
        # Every attempt carries the same frame id and the capture time of the
        # first one, so a frame stored twice shows as one frame id twice.
        headers = {
            "Content-Type": frame.content_type,
            "Camera-Id": frame.camera_id,
            "Captured-At": str(time.time_ns()),
            "Frame-Id": frame.frame_id or uuid.uuid4().hex,
        }
        self.report.sent += 1
        reason = ""
        for attempt in range(self.options.max_retries + 1):
            retry_after_s = None
            try:
                response = self.client.post(
                    path, content=frame.payload, headers=headers
                )
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 202:
                    self.report.acked += 1
                    if self.on_ack is not None:
                        self.on_ack(response.json())
                    return
                reason = _error_message(response)
                if response.status_code in (401, 403, 404):
                    raise CameraError(
                        f"the edge at {self.options.url} rejected {frame.label}: "
                        f"{reason}"
                    )
                if response.status_code not in RETRY_STATUSES:
                    self.report.fail(frame.label, reason)
                    return
                retry_after_s = retry_after_header(response.headers.get("retry-after"))
            if attempt == self.options.max_retries:
                break
            self.report.retries += 1
            delay = backoff_delay_s(
                attempt,
                retry_after_s,
                self.options.backoff_s,
                self.options.max_backoff_s,
            )
            log.debug("retrying %s in %.2f s after %s", frame.label, delay, reason)
            self.sleep(delay)
        self.report.fail(
            frame.label, f"gave up after {self.options.max_retries} retries: {reason}"
        )

    def close(self) -> None:
        self.client.close()


def send_http(
    options: CameraOptions,
    frames: Iterator[SourceFrame],
    report: CameraReport,
    progress: ProgressLine,
    on_ack: AckCallback | None = None,
) -> None:
    sender = HttpSender(options, report, on_ack)
    pacer = Pacer(options.fps)
    try:
        for frame in frames:
            time.sleep(pacer.delay_s())
            sender.send(frame)
            progress.update(report)
    finally:
        sender.close()


# WebSocket


@dataclass
class PendingFrame:
    frame: SourceFrame
    captured_at_ns: int
    frame_id: str
    attempts: int = 0
    due_at: float = 0.0


class StreamSender:
    """Sender that streams frames over the edge's WebSocket within its credit.

    Frames rejected with 429 or 503 wait their backoff in a retry list and go
    out before new frames. When the connection drops, the frames in flight
    join the retry list and the sender reconnects with backoff.
    """

    def __init__(
        self,
        options: CameraOptions,
        report: CameraReport,
        progress: ProgressLine,
        on_ack: AckCallback | None = None,
    ) -> None:
        self.options = options
        self.report = report
        self.progress = progress
        self.on_ack = on_ack
        self.pacer = Pacer(options.fps)
        self.in_flight: dict[int, PendingFrame] = {}
        self.retry: list[PendingFrame] = []
        self.credit = 0
        self.next_seq = 0
        self.exhausted = False
        self.changed = asyncio.Event()

    @property
    def url(self) -> str:
        base = self.options.url.rstrip("/")
        if base.startswith("http"):
            base = "ws" + base[len("http") :]
        return f"{base}/v1/lines/{self.options.line}/stream"

    async def run(self, frames: Iterator[SourceFrame]) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus, WebSocketException

        headers = (
            {"Authorization": f"Bearer {self.options.token}"}
            if self.options.token
            else {}
        )
        failures = 0
        while True:
            acked_before = self.report.acked
            try:
                async with connect(
                    self.url,
                    additional_headers=headers,
                    compression=None,
                    open_timeout=self.options.timeout_s,
                ) as websocket:
                    if await self._session(websocket, frames):
                        return
                    reason = "the edge closed the connection"
            except InvalidStatus as exc:
                status = exc.response.status_code
                body = (
                    exc.response.body.decode("utf-8", "replace")[:300]
                    if exc.response.body
                    else ""
                )
                if status not in RETRY_STATUSES:
                    raise CameraError(
                        f"the edge at {self.url} rejected the stream: {status} {body}"
                    ) from None
                reason = f"handshake rejected with {status}"
            except (OSError, WebSocketException, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            self._requeue_in_flight()
            if self.report.acked > acked_before:
                failures = 0  # the connection worked for a while: a fresh failure
            if failures >= self.options.max_retries:
                self._give_up(reason)
            delay = backoff_delay_s(
                failures, None, self.options.backoff_s, self.options.max_backoff_s
            )
            failures += 1
            self.report.retries += 1
            log.warning(
                "WebSocket to %s lost (%s); reconnecting in %.2f s",
                self.url,
                reason,
                delay,
            )
            await asyncio.sleep(delay)

    async def _session(self, websocket: Any, frames: Iterator[SourceFrame]) -> bool:
        """Send until every frame is settled (True) or the connection ends (False)."""
        from ingest.stream import encode_envelope

        self.credit = 0
        receiver = asyncio.create_task(self._receive(websocket))
        try:
            while True:
                while len(self.in_flight) >= self.credit:
                    if not await self._wait_change(receiver):
                        return False
                pending = self._take(frames)
                if pending is None:
                    if not self.in_flight and not self.retry:
                        return True
                    timeout = (
                        max(self.retry[0].due_at - time.monotonic(), 0)
                        if self.retry
                        else None
                    )
                    if not await self._wait_change(receiver, timeout):
                        return False
                    continue
                await asyncio.sleep(self.pacer.delay_s())
                seq = self.next_seq
                self.next_seq += 1
                self.in_flight[seq] = pending
                header = {
                    "seq": seq,
                    "camera_id": pending.frame.camera_id,
                    "content_type": pending.frame.content_type,
                    "captured_at": pending.captured_at_ns,
                    "frame_id": pending.frame_id,
                }
                await websocket.send(encode_envelope(header, pending.frame.payload))
                self.progress.update(self.report)
        finally:
            receiver.cancel()
            if receiver.done() and not receiver.cancelled():
                # Retrieve the connection error, which run() reports from its own catch.
                receiver.exception()

    def _take(self, frames: Iterator[SourceFrame]) -> PendingFrame | None:
        if self.retry and self.retry[0].due_at <= time.monotonic():
            return self.retry.pop(0)
        if self.exhausted:
            return None
        frame = next(frames, None)
        if frame is None:
            self.exhausted = True
            return None
        self.report.sent += 1
        return PendingFrame(frame, time.time_ns(), frame.frame_id or uuid.uuid4().hex)

    async def _wait_change(
        self, receiver: asyncio.Task[None], timeout: float | None = None
    ) -> bool:
        """Wait for a reply or ``timeout``, and return False if the connection ended."""
        waiter = asyncio.create_task(self.changed.wait())
        done, _ = await asyncio.wait(
            {receiver, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        self.changed.clear()
        return receiver not in done

    async def _receive(self, websocket: Any) -> None:
        async for raw in websocket:
            message = json.loads(raw)
            kind = message.get("type")
            if kind == "credit":
                self.credit = int(message["credit"])
            elif kind == "throttle":
                self.report.throttled += 1
            elif kind in ("ack", "error"):
                pending = self.in_flight.pop(message.get("seq"), None)
                if pending is None:
                    log.warning("reply for unknown seq %r ignored", message.get("seq"))
                elif kind == "ack":
                    self.report.acked += 1
                    if self.on_ack is not None:
                        self.on_ack(message)
                else:
                    self._rejected(pending, message)
            self.changed.set()

    def _rejected(self, pending: PendingFrame, message: dict[str, Any]) -> None:
        status = message.get("status")
        reason = f"{status} {message.get('error')}: {message.get('message')}"
        if status not in RETRY_STATUSES or pending.attempts >= self.options.max_retries:
            suffix = f" after {pending.attempts} retries" if pending.attempts else ""
            self.report.fail(pending.frame.label, reason + suffix)
            return
        delay = backoff_delay_s(
            pending.attempts,
            message.get("retry_after_s"),
            self.options.backoff_s,
            self.options.max_backoff_s,
        )
        self._schedule_retry(pending, delay)

    def _schedule_retry(self, pending: PendingFrame, delay_s: float) -> None:
        pending.attempts += 1
        pending.due_at = time.monotonic() + delay_s
        self.report.retries += 1
        self.retry.append(pending)
        self.retry.sort(key=lambda item: item.due_at)

    def _requeue_in_flight(self) -> None:
        for seq in sorted(self.in_flight):
            pending = self.in_flight.pop(seq)
            if pending.attempts >= self.options.max_retries:
                self.report.fail(
                    pending.frame.label, "connection lost, retries used up"
                )
            else:
                self._schedule_retry(pending, 0.0)

    def _give_up(self, reason: str) -> None:
        for pending in self.retry:
            self.report.fail(pending.frame.label, f"gave up: {reason}")
        self.retry.clear()
        raise CameraError(
            f"WebSocket to {self.url} failed {self.options.max_retries + 1} times in a "
            f"row; last: {reason}"
        )


# Kafka


def send_kafka(
    settings: Settings,
    options: CameraOptions,
    frames: Iterator[SourceFrame],
    report: CameraReport,
    progress: ProgressLine,
) -> None:
    """Produce straight to the line's topic with the producer of ``faultline feed``."""
    from pipeline.kafka import list_lines

    if options.line not in list_lines(settings):
        raise CameraError(
            f"line {options.line!r} not found on {settings.bootstrap_servers}: "
            "create it "
            f"with `faultline topics create --line {options.line}`"
        )
    producer = FrameProducer(settings)
    feed_report = FeedReport()
    pacer = Pacer(options.fps)
    for frame in frames:
        time.sleep(pacer.delay_s())
        producer.send(options.line, frame, feed_report, captured_at_ns=time.time_ns())
        _copy_feed_counts(feed_report, report)
        progress.update(report)
    try:
        producer.flush(options.timeout_s)
    finally:
        _copy_feed_counts(feed_report, report)


def _copy_feed_counts(feed_report: FeedReport, report: CameraReport) -> None:
    report.sent = feed_report.sent
    report.acked = feed_report.acked
    report.failed = feed_report.failed
    report.errors = feed_report.errors[:MAX_ERRORS_KEPT]


# Entry point


def run_camera(
    settings: Settings,
    options: CameraOptions,
    frames: Iterator[SourceFrame],
    total: int | None = None,
    on_ack: AckCallback | None = None,
    progress_stream: TextIO | None = None,
) -> CameraReport:
    """Send ``frames`` to ``options.line`` and return the counts.

    ``on_ack`` receives each ack body of the edge (HTTP and WebSocket only).
    Raises CameraError when the edge rejects the camera itself or stays
    unreachable through every retry.
    """
    report = CameraReport(total=total)
    progress = ProgressLine(
        f"{options.line} via {options.via}", progress_stream, options.progress
    )
    try:
        if options.via == "http":
            send_http(options, frames, report, progress, on_ack)
        elif options.via == "ws":
            asyncio.run(StreamSender(options, report, progress, on_ack).run(frames))
        elif options.via == "kafka":
            send_kafka(settings, options, frames, report, progress)
        else:
            raise ConfigError(
                f"--via {options.via!r} is invalid: use http, ws or kafka"
            )
    finally:
        progress.close(report)
    log.info(
        "camera on %s via %s: sent %d, acked %d, failed %d, retries %d",
        options.line,
        options.via,
        report.sent,
        report.acked,
        report.failed,
        report.retries,
    )
    return report
