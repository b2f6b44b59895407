"""Turn a batch of frame messages into result and dead-letter records.

Every frame in, exactly one outcome out: a ``ResultRecord`` or a
``DeadLetter`` with the original bytes and headers. Headers are checked
first, then the bytes are checked and decoded in a thread pool, then the
decoded images go through the model as one batch on a single inference
thread (off the event loop; one model per process). When a batch fails in
the model, each of its frames is retried alone, so one bad frame cannot
dead-letter its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.detector import Detector
from models.registry import ModelSpec
from pipeline.topics import format_position
from schemas import DeadLetter, Detection, FrameHeaders, HeaderError, ResultRecord, StageLatency
from schemas.images import check_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameMessage:
    """One consumed frame message and its position."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]

    @property
    def position(self) -> str:
        return format_position(self.topic, self.partition, self.offset)


@dataclass(frozen=True)
class Outcome:
    message: FrameMessage
    result: ResultRecord | None = None
    deadletter: DeadLetter | None = None


@dataclass
class _Decoded:
    message: FrameMessage
    headers: FrameHeaders
    image: np.ndarray
    decode_s: float


def decode(value: bytes) -> np.ndarray:
    """Decode JPEG, PNG or BMP bytes to 8-bit (H, W) mono or (H, W, 3) BGR."""
    import cv2

    image = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("OpenCV could not decode the bytes")
    if image.dtype != np.uint8:
        # 16-bit PNGs keep their high byte, the usual 8-bit view of them.
        image = (image >> 8).astype(np.uint8) if image.dtype == np.uint16 else image.astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


class InferenceThread:
    """Owns the one detector of this process and runs it on one thread."""

    def __init__(self, factory: Callable[[], Detector]) -> None:
        self._factory = factory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._detector: Detector | None = None

    def _load(self) -> Detector:
        if self._detector is None:
            self._detector = self._factory()
        return self._detector

    def preload(self) -> Detector:
        """Load the model on the inference thread now; errors reach the caller."""
        return self._executor.submit(self._load).result()

    async def predict(self, images: list[np.ndarray]) -> list[list[Detection]]:
        def run() -> list[list[Detection]]:
            return self._load().predict(images)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class BatchProcessor:
    def __init__(
        self,
        spec: ModelSpec,
        inference: InferenceThread,
        decode_threads: int = 2,
        run_id: str = "",
    ) -> None:
        self.spec = spec
        self.inference = inference
        self.run_id = run_id
        self._decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")

    def close(self) -> None:
        self._decode_pool.shutdown(wait=True)
        self.inference.close()

    async def process(self, messages: Sequence[FrameMessage]) -> list[Outcome]:
        """Return one outcome per message, in the order of ``messages``."""
        started_ns = time.time_ns()
        outcomes: dict[int, Outcome] = {}
        pending = []
        for index, message in enumerate(messages):
            try:
                headers = FrameHeaders.from_kafka(message.headers)
            except HeaderError as exc:
                outcomes[index] = self._deadletter(message, "invalid-headers", "headers", str(exc))
                continue
            pending.append((index, message, headers))
        loop = asyncio.get_running_loop()
        decoded_jobs = [
            loop.run_in_executor(self._decode_pool, self._decode_one, message, headers)
            for _, message, headers in pending
        ]
        decoded: list[tuple[int, _Decoded]] = []
        for (index, message, _), result in zip(
            pending, await asyncio.gather(*decoded_jobs), strict=True
        ):
            if isinstance(result, str):
                outcomes[index] = self._deadletter(message, "decode-failed", "decode", result)
            else:
                decoded.append((index, result))
        for index, outcome in await self._infer(decoded, started_ns):
            outcomes[index] = outcome
        return [outcomes[i] for i in range(len(messages))]

    def _decode_one(self, message: FrameMessage, headers: FrameHeaders) -> _Decoded | str:
        began = time.perf_counter()
        value = message.value or b""
        problem = check_image(value, headers.content_type)
        if problem is not None:
            return problem
        try:
            image = decode(value)
        except (ValueError, Exception) as exc:  # noqa: B014 - OpenCV raises cv2.error
            return f"decode failed: {exc}"
        return _Decoded(message, headers, image, time.perf_counter() - began)

    async def _infer(
        self, decoded: list[tuple[int, _Decoded]], started_ns: int
    ) -> list[tuple[int, Outcome]]:
        if not decoded:
            return []
        images = [item.image for _, item in decoded]
        began = time.perf_counter()
        try:
            detections = await self.inference.predict(images)
        except Exception as exc:
            if len(decoded) == 1:
                index, item = decoded[0]
                log.warning("inference failed on %s: %s", item.message.position, exc)
                return [(index, self._deadletter(item.message, "inference-failed", "inference", f"{type(exc).__name__}: {exc}", attempts=2))]
            log.warning("inference failed on a batch of %d frames (%s); retrying each alone", len(decoded), exc)
            retried: list[tuple[int, Outcome]] = []
            for pair in decoded:
                retried.extend(await self._infer([pair], started_ns))
            return retried
        inference_s = time.perf_counter() - began
        inferred_ns = time.time_ns()
        return [
            (index, Outcome(item.message, result=self._result(item, found, inference_s, len(decoded), started_ns, inferred_ns)))
            for (index, item), found in zip(decoded, detections, strict=True)
        ]

    def _result(
        self,
        item: _Decoded,
        detections: list[Detection],
        inference_s: float,
        batch_size: int,
        started_ns: int,
        inferred_ns: int,
    ) -> ResultRecord:
        headers = item.headers
        height, width = item.image.shape[:2]
        latency = StageLatency(
            queue_s=max(0.0, (started_ns - headers.ingested_at_ns) / 1e9),
            decode_s=item.decode_s,
            inference_s=inference_s,
            total_s=max(0.0, (inferred_ns - headers.ingested_at_ns) / 1e9),
            batch_size=batch_size,
        )
        return ResultRecord(
            frame_id=headers.frame_id,
            line_id=headers.line_id,
            camera_id=headers.camera_id,
            captured_at_ns=headers.captured_at_ns,
            ingested_at_ns=headers.ingested_at_ns,
            inferred_at_ns=inferred_ns,
            model_name=self.spec.name,
            model_version=self.spec.version,
            image_width=int(width),
            image_height=int(height),
            detections=tuple(detections),
            verdict=self.spec.verdict(detections),
            latency=latency,
            source_topic=item.message.topic,
            source_partition=item.message.partition,
            source_offset=item.message.offset,
            run_id=self.run_id,
            trace_id=headers.trace_id,
        )

    @staticmethod
    def _deadletter(
        message: FrameMessage, reason: str, stage: str, text: str, attempts: int = 1
    ) -> Outcome:
        log.warning("dead-lettering %s: %s (%s)", message.position, reason, text)
        record = DeadLetter(
            reason=reason,
            message=text,
            stage=stage,
            source_topic=message.topic,
            source_partition=message.partition,
            source_offset=message.offset,
            attempts=attempts,
        )
        return Outcome(message, deadletter=record)


def headers_of(raw: Any) -> list[tuple[str, bytes]]:
    """Kafka headers from aiokafka or confluent-kafka as a list of pairs."""
    if not raw:
        return []
    items = raw.items() if isinstance(raw, dict) else raw
    return [(k, v if isinstance(v, bytes) else str(v or "").encode()) for k, v in items]
