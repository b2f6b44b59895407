"""Fetch one frame back from Kafka by its position, and draw boxes on it.

A frame's value on ``frames.<line>`` is the image exactly as the camera sent
it, so the bytes returned here are identical to the ingested ones while the
topic's retention keeps them. A position before the partition's low
watermark was deleted by retention; one at or after the high watermark does
not exist yet. Both raise FrameNotFoundError.

Consumers are expensive to create (a metadata round trip each), so a small
pool is kept and reused. They assign one partition at a time by hand, never
join a group and commit nothing.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.errors import BrokerError, FaultlineError
from pipeline.kafka import consumer_config
from pipeline.settings import Settings
from pipeline.topics import FRAMES_PREFIX, format_position, line_of_topic
from schemas import ResultRecord
from schemas.images import sniff_content_type
from schemas.records import CONTENT_TYPES, headers_dict

log = logging.getLogger(__name__)

POOL_CONSUMERS = 2
FETCH_TIMEOUT_S = 10.0
ANNOTATED_JPEG_QUALITY = 90
# BGR red for boxes, white for label text.
BOX_COLOUR = (0, 0, 255)
TEXT_COLOUR = (255, 255, 255)


class FrameNotFoundError(FaultlineError):
    """No frame at a position: unknown topic or partition, or offset out of range."""


@dataclass(frozen=True)
class FetchedFrame:
    """The value and headers of one frame message."""

    topic: str
    partition: int
    offset: int
    payload: bytes
    headers: dict[str, bytes]
    timestamp_ms: int

    @property
    def line(self) -> str:
        return line_of_topic(self.topic)

    @property
    def content_type(self) -> str:
        """The declared content type when it is an image type, else the sniffed one."""
        declared = self.headers.get("content-type", b"").decode("utf-8", "replace")
        if declared in CONTENT_TYPES:
            return declared
        return sniff_content_type(self.payload) or "application/octet-stream"

    def header_text(self, name: str) -> str:
        return self.headers.get(name, b"").decode("utf-8", "replace")


def check_frames_topic(topic: str) -> str:
    """Return the line of a ``frames.<line>`` topic, or raise FrameNotFoundError."""
    if not topic.startswith(FRAMES_PREFIX):
        raise FrameNotFoundError(f"topic {topic!r} is not a frames.<line> topic")
    try:
        return line_of_topic(topic)
    except FaultlineError as exc:
        raise FrameNotFoundError(str(exc)) from None


class FrameFetcher:
    """Reads single frame messages by topic, partition and offset."""

    def __init__(self, settings: Settings, pool_size: int = POOL_CONSUMERS) -> None:
        self.settings = settings
        self._pool_size = pool_size
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._created = 0
        self._created_lock = threading.Lock()
        self._closed = False
        instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._group_id = f"faultline-edge-frames-{instance}"

    def _config(self) -> dict[str, Any]:
        overrides = {
            # Report an out-of-range offset instead of jumping to another record.
            "auto.offset.reset": "error",
            # Measured with confluent-kafka 2.16 on a local broker. With only
            # the first setting, some fetches waited a whole second
            # (fetch.queue.backoff.ms), and with only the second, 500 ms. With
            # both, a fetch takes a few milliseconds.
            "queued.min.messages": 1,
            "fetch.queue.backoff.ms": 0,
        }
        return consumer_config(self.settings, self._group_id, **overrides)

    def _acquire(self, timeout_s: float) -> Any:
        from confluent_kafka import Consumer

        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._created_lock:
            create = self._created < self._pool_size
            if create:
                self._created += 1
        if create:
            return Consumer(self._config())
        try:
            return self._idle.get(timeout=timeout_s)
        except queue.Empty:
            raise BrokerError(
                f"all {self._pool_size} frame consumers stayed busy for "
                f"{timeout_s:.0f} s; retry the request"
            ) from None

    def _release(self, consumer: Any) -> None:
        if self._closed:
            consumer.close()
        else:
            self._idle.put(consumer)

    def fetch(
        self,
        topic: str,
        partition: int,
        offset: int,
        timeout_s: float = FETCH_TIMEOUT_S,
    ) -> FetchedFrame:
        """Return the frame at ``topic[partition]@offset``.

        Raises FrameNotFoundError when the topic, the partition or the offset
        does not exist (any more), BrokerError when Kafka does not respond in time.
        """
        check_frames_topic(topic)
        consumer = self._acquire(timeout_s)
        try:
            return self._fetch_with(consumer, topic, partition, offset, timeout_s)
        finally:
            try:
                consumer.unassign()
            except Exception as exc:  # a broken consumer is dropped from the pool
                log.warning("dropping a frame consumer after unassign failed: %s", exc)
                consumer.close()
                with self._created_lock:
                    self._created -= 1
            else:
                self._release(consumer)

    def _fetch_with(
        self, consumer: Any, topic: str, partition: int, offset: int, timeout_s: float
    ) -> FetchedFrame:
        from confluent_kafka import KafkaError, KafkaException, TopicPartition

        position = format_position(topic, partition, offset)
        try:
            metadata = consumer.list_topics(topic, timeout=timeout_s)
            topic_metadata = metadata.topics.get(topic)
            if topic_metadata is None or topic_metadata.error is not None:
                raise FrameNotFoundError(f"topic {topic!r} does not exist")
            if partition not in topic_metadata.partitions:
                raise FrameNotFoundError(
                    f"topic {topic!r} has no partition {partition}; it has "
                    f"{len(topic_metadata.partitions)}"
                )
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout_s, cached=False
            )
        except KafkaException as exc:
            raise BrokerError(
                f"Kafka at {self.settings.bootstrap_servers} failed to locate "
                f"{position}: {exc}"
            ) from exc
        if offset < low:
            raise FrameNotFoundError(
                f"{position} was deleted by retention: the earliest offset is {low}"
            )
        if offset >= high:
            raise FrameNotFoundError(
                f"{position} does not exist: the next offset is {high}"
            )
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"reading {position} timed out after {timeout_s:.0f} s"
                )
            message = consumer.poll(remaining)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() in (
                    KafkaError._AUTO_OFFSET_RESET,
                    KafkaError.OFFSET_OUT_OF_RANGE,
                ):
                    raise FrameNotFoundError(
                        f"{position} was deleted by retention while it was read"
                    )
                raise BrokerError(f"reading {position} failed: {error}")
            if message.offset() != offset:
                # Transaction markers and compaction leave offsets without a record.
                raise FrameNotFoundError(
                    f"{position} contains no frame; the next record is at "
                    f"{message.offset()}"
                )
            _, timestamp_ms = message.timestamp()
            return FetchedFrame(
                topic=topic,
                partition=partition,
                offset=offset,
                payload=message.value() or b"",
                headers=headers_dict(message.headers()),
                timestamp_ms=int(timestamp_ms),
            )

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def annotate(frame: FetchedFrame, record: ResultRecord) -> bytes:
    """Draw the record's boxes and labels on the frame; return JPEG bytes."""
    import cv2
    import numpy as np

    image = cv2.imdecode(np.frombuffer(frame.payload, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise FrameNotFoundError(
            f"{format_position(frame.topic, frame.partition, frame.offset)} "
            "is not a decodable image"
        )
    height, width = image.shape[:2]
    thickness = max(2, round(min(height, width) / 320))
    font_scale = max(0.4, min(height, width) / 1280)
    for detection in record.detections:
        # Boxes are x1 y1 x2 y2 in source-image pixels, which are this image's pixels.
        top_left = (round(detection.x1), round(detection.y1))
        bottom_right = (round(detection.x2), round(detection.y2))
        cv2.rectangle(image, top_left, bottom_right, BOX_COLOUR, thickness)
        label = f"{detection.class_name} {detection.confidence:.2f}"
        (text_width, text_height), baseline = cv2.getTextSize(
            label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1
        )
        # The label sits above the box, moved inside the image at the edges.
        text_left = max(0, min(top_left[0], width - text_width - 4))
        text_top = max(0, top_left[1] - text_height - baseline - 2)
        cv2.rectangle(
            image,
            (text_left, text_top),
            (text_left + text_width + 4, text_top + text_height + baseline + 2),
            BOX_COLOUR,
            -1,
        )
        cv2.putText(
            image, label, (text_left + 2, text_top + text_height + 1),
            cv2.FONT_HERSHEY_SIMPLEX, font_scale, TEXT_COLOUR, 1, cv2.LINE_AA,
        )  # fmt: skip
    ok, encoded = cv2.imencode(
        ".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, ANNOTATED_JPEG_QUALITY]
    )
    if not ok:
        raise FaultlineError(
            f"encoding the annotated frame {record.frame_id} as JPEG failed"
        )
    return encoded.tobytes()
