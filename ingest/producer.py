"""The ingest edge's Kafka producer: broker state, delivery reports, error mapping."""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from ingest.metrics import EdgeMetrics
from ingest.request_parsing import IngestError
from pipeline.errors import ConfigError
from pipeline.kafka import producer_config, topic_max_bytes
from pipeline.logs import RepeatFilter
from pipeline.settings import Settings
from pipeline.topics import frames_topic

log = logging.getLogger(__name__)

# A delivery report arrives within delivery.timeout.ms. This margin only
# covers a report that librdkafka never serves.
ACK_GRACE_S = 5.0
# The metadata request that checks the broker waits at most this long.
BROKER_CHECK_TIMEOUT_S = 2.0
# A request for an unknown line refreshes the topic list, at most this often.
MIN_TOPIC_REFRESH_INTERVAL_S = 0.1
PRODUCER_CLOSE_TIMEOUT_S = 10.0


# librdkafka logs every failed reconnect, several times a second while the
# broker is down. Its first word is the facility (FAIL, GETPID, ...).
LIBRDKAFKA_LOG = logging.getLogger(f"{__name__}.librdkafka")
LIBRDKAFKA_LOG.addFilter(RepeatFilter(60.0))
PRODUCER_ERROR_LOG = logging.getLogger(f"{__name__}.producer")
PRODUCER_ERROR_LOG.addFilter(RepeatFilter(60.0))


class BrokerState(enum.Enum):
    STARTING = "starting"
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"
    FAILED = "failed"  # after a fatal producer error, which needs an edge restart
    CLOSED = "closed"


@dataclass(frozen=True)
class Delivery:
    topic: str
    partition: int
    offset: int
    latency_s: float


class EdgeProducer:
    """The edge's one idempotent producer, bridged to asyncio.

    A thread serves librdkafka's callbacks (``poll``); each delivery report
    resolves its request's future through ``call_soon_threadsafe``. A second
    thread requests metadata every ``ingest_broker_check_interval_s``:
    success marks the broker reachable and refreshes the set of topics, and
    failure marks it unreachable. librdkafka's ``_ALL_BROKERS_DOWN`` error marks
    it unreachable at once, without waiting for the next check.
    """

    def __init__(self, settings: Settings, metrics: EdgeMetrics) -> None:
        if settings.ingest_queue_max_bytes < topic_max_bytes(settings):
            raise ConfigError(
                f"FAULTLINE_INGEST_QUEUE_MAX_BYTES={settings.ingest_queue_max_bytes} "
                f"is below one frame's message of {topic_max_bytes(settings)} bytes "
                "(FAULTLINE_MAX_MESSAGE_BYTES plus overhead): raise it"
            )
        self.settings = settings
        self.metrics = metrics
        self._state = BrokerState.STARTING
        self._state_lock = threading.Lock()
        self._topics: frozenset[str] = frozenset()
        # Start times of the last metadata request, and of the last one that
        # returned: topics created before the latter are in ``_topics``.
        self._refresh_started_at = 0.0
        self._topics_as_of = 0.0
        self._refresh_lock = asyncio.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: Any = None

    @property
    def state(self) -> BrokerState:
        return self._state

    @property
    def reachable(self) -> bool:
        return self._state is BrokerState.REACHABLE

    def config(self) -> dict[str, Any]:
        return producer_config(
            self.settings,
            **{
                "delivery.timeout.ms": int(self.settings.ingest_ack_timeout_s * 1000),
                "queue.buffering.max.messages": self.settings.ingest_queue_max_frames,
                "queue.buffering.max.kbytes": self.settings.ingest_queue_max_bytes
                // 1024,
                # Reconnect within a second of the broker's return.
                "reconnect.backoff.max.ms": 1000,
                "log.connection.close": False,
                "error_cb": self._on_error,
                "logger": LIBRDKAFKA_LOG,
            },
        )

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._producer = Producer(self.config())
        for name, target in (
            ("poll", self._poll_loop),
            ("broker-check", self._check_loop),
        ):
            thread = threading.Thread(target=target, name=f"ingest-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        await asyncio.to_thread(self.refresh_topics)
        log.info(
            "ingest producer started for %s: broker %s",
            self.settings.bootstrap_servers,
            self._state.value,
        )

    async def close(self) -> None:
        if self._producer is None:
            return
        self._stopping.set()
        remaining = await asyncio.to_thread(
            self._producer.flush, PRODUCER_CLOSE_TIMEOUT_S
        )
        if remaining:
            log.warning(
                "closing the ingest producer with %d frames not acknowledged "
                "after %.0f s",
                remaining,
                PRODUCER_CLOSE_TIMEOUT_S,
            )
        for thread in self._threads:
            await asyncio.to_thread(thread.join, BROKER_CHECK_TIMEOUT_S + 1)
        self._set_state(BrokerState.CLOSED, "edge shut down")

    def alive(self) -> bool:
        """Return False after a fatal producer error or when a thread died."""
        threads_alive = all(thread.is_alive() for thread in self._threads)
        return self._state is not BrokerState.FAILED and (
            threads_alive or self._stopping.is_set()
        )

    # Threads

    def _poll_loop(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(0.1)

    def _check_loop(self) -> None:
        interval = self.settings.ingest_broker_check_interval_s
        while not self._stopping.wait(interval):
            self.refresh_topics()

    def refresh_topics(self) -> bool:
        """Request the broker's topic list and return whether the request succeeded."""
        started_at = time.monotonic()
        self._refresh_started_at = started_at
        try:
            metadata = self._producer.list_topics(timeout=BROKER_CHECK_TIMEOUT_S)
        except KafkaException as exc:
            self._set_state(
                BrokerState.UNREACHABLE, f"metadata request failed: {exc.args[0]}"
            )
            return False
        self._topics = frozenset(metadata.topics)
        self._topics_as_of = max(self._topics_as_of, started_at)
        if metadata.brokers:
            self._set_state(BrokerState.REACHABLE, "metadata request succeeded")
        else:
            self._set_state(BrokerState.UNREACHABLE, "metadata lists no broker")
        return True

    def _set_state(self, state: BrokerState, reason: str) -> None:
        with self._state_lock:
            previous = self._state
            if previous is state or previous in (
                BrokerState.FAILED,
                BrokerState.CLOSED,
            ):
                return
            self._state = state
        self.metrics.broker_reachable.set(1 if state is BrokerState.REACHABLE else 0)
        if state is BrokerState.REACHABLE:
            log.info(
                "broker %s is reachable (%s)", self.settings.bootstrap_servers, reason
            )
        elif state is BrokerState.UNREACHABLE:
            log.warning(
                "broker %s is unreachable (%s), so frames get 503 until it is back",
                self.settings.bootstrap_servers,
                reason,
            )

    def _on_error(self, error: Any) -> None:
        if error.fatal():
            log.error("fatal producer error, restart the edge: %s", error)
            self._set_state(BrokerState.UNREACHABLE, str(error))
            with self._state_lock:
                self._state = BrokerState.FAILED
            return
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self._set_state(BrokerState.UNREACHABLE, error.str())
            return
        # Connection errors repeat at every reconnect. The filter keeps one a minute.
        PRODUCER_ERROR_LOG.warning("%s: %s", error.name(), error.str())

    # Lines

    def known_line(self, line: str) -> bool:
        """Return whether the cached topic list has the line's frames topic."""
        try:
            return frames_topic(line) in self._topics
        except ConfigError:
            return False

    async def require_line(self, line: str) -> str:
        """Return the line's frames topic, or raise IngestError 404 (or 503)."""
        try:
            topic = frames_topic(line)
        except ConfigError as exc:
            raise IngestError(404, "unknown-line", str(exc), value=line[:80]) from None
        if topic in self._topics:
            return topic
        if not self.reachable:
            # Without the broker the edge cannot tell an unknown line from a new one.
            raise self.unavailable()
        await self._refresh_after(time.monotonic())
        if topic in self._topics:
            return topic
        if not self.reachable:
            raise self.unavailable()
        raise IngestError(
            404,
            "unknown-line",
            f"line {line!r} not found: topic {topic} does not exist. Create it with "
            f"`faultline topics create --line {line}`",
            value=line,
        )

    async def _refresh_after(self, missed_at: float) -> None:
        """Wait for a topic list from a request that started after ``missed_at``."""
        async with self._refresh_lock:
            if self._topics_as_of > missed_at:
                return
            wait_s = (
                self._refresh_started_at
                + MIN_TOPIC_REFRESH_INTERVAL_S
                - time.monotonic()
            )
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            await asyncio.to_thread(self.refresh_topics)

    # Producing

    def unavailable(self) -> IngestError:
        return IngestError(
            503,
            "broker-unavailable",
            f"Kafka at {self.settings.bootstrap_servers} is unavailable: the "
            f"edge's broker state is {self._state.value}; retry after "
            f"{self.settings.ingest_retry_after_s} s",
            value=self._state.value,
            retry_after_s=self.settings.ingest_retry_after_s,
        )

    def produce(
        self,
        line: str,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]],
        timestamp_ms: int,
    ) -> asyncio.Future[Delivery | Any]:
        """Hand one frame to librdkafka and return the future of its delivery report.

        Raises IngestError 503 while the broker is unreachable and 429 when
        the producer queue is full.
        """
        loop = self._loop
        if not self.reachable or loop is None:
            raise self.unavailable()
        future: asyncio.Future[Delivery | Any] = loop.create_future()

        def delivered(error: Any, message: Any) -> None:
            try:
                loop.call_soon_threadsafe(_settle, future, error, message)
            except RuntimeError:
                pass  # the loop closed while the edge shut down

        try:
            self._producer.produce(
                frames_topic(line),
                value=value,
                key=key,
                headers=headers,
                timestamp=timestamp_ms,
                on_delivery=delivered,
            )
        except BufferError:
            raise IngestError(
                429,
                "queue-full",
                f"the producer queue is full ({len(self._producer)} frames waiting for "
                "the broker); retry after "
                f"{self.settings.ingest_retry_after_s} s, or raise "
                "FAULTLINE_INGEST_QUEUE_MAX_FRAMES / FAULTLINE_INGEST_QUEUE_MAX_BYTES",
                value=len(self._producer),
                limit=self.settings.ingest_queue_max_frames,
                retry_after_s=self.settings.ingest_retry_after_s,
            ) from None
        except KafkaException as exc:
            raise self.delivery_error(exc.args[0], line, len(value)) from None
        self.metrics.frames_in_flight.labels(line).inc()
        return future

    async def wait(
        self, line: str, future: asyncio.Future[Delivery | Any], size: int
    ) -> Delivery:
        """Wait for the delivery report; raise IngestError if the frame was rejected."""
        try:
            outcome = await asyncio.wait_for(
                future, timeout=self.settings.ingest_ack_timeout_s + ACK_GRACE_S
            )
        except TimeoutError:
            raise IngestError(
                503,
                "broker-unavailable",
                "no delivery report within "
                f"{self.settings.ingest_ack_timeout_s + ACK_GRACE_S:g} s",
                retry_after_s=self.settings.ingest_retry_after_s,
            ) from None
        finally:
            self.metrics.frames_in_flight.labels(line).dec()
        if not isinstance(outcome, Delivery):
            raise self.delivery_error(outcome, line, size)
        self.metrics.produce_seconds.labels(line).observe(outcome.latency_s)
        return outcome

    def delivery_error(self, error: Any, line: str, size: int) -> IngestError:
        """Map a librdkafka error on one frame to the reply's status."""
        code = error.code()
        topic = frames_topic(line)
        retry_after_s = self.settings.ingest_retry_after_s
        if code == KafkaError.MSG_SIZE_TOO_LARGE:
            return IngestError(
                413,
                "frame-too-large",
                f"frame of {size} bytes is too large for {topic}: the topic's "
                "max.message.bytes is below the edge's limit of "
                f"{self.settings.max_message_bytes} bytes. Create line topics "
                "with the edge's FAULTLINE_MAX_MESSAGE_BYTES",
                value=size,
            )
        if code in (
            KafkaError.UNKNOWN_TOPIC_OR_PART,
            KafkaError._UNKNOWN_TOPIC,
            KafkaError._UNKNOWN_PARTITION,
        ):
            return IngestError(
                404,
                "unknown-line",
                f"topic {topic} does not exist: {error.str()}",
                value=line,
            )
        if code == KafkaError.INVALID_TIMESTAMP:
            return IngestError(
                422,
                "invalid-header",
                f"the broker rejected the capture time of the frame for {topic}: it is "
                "outside the topic's log.message.timestamp limits",
                value=error.str(),
            )
        if (
            code == KafkaError._MSG_TIMED_OUT
            or error.retriable()
            or code in _UNAVAILABLE_CODES
        ):
            return IngestError(
                503,
                "broker-unavailable",
                f"the broker did not acknowledge the frame for {topic}: {error.str()}",
                value=error.name(),
                retry_after_s=retry_after_s,
            )
        return IngestError(
            502,
            "broker-error",
            f"the broker rejected the frame for {topic}: {error.str()}",
            value=error.name(),
        )


# Errors that mean "not now" even when librdkafka did not flag them retriable:
# the cluster lacks a leader or in-sync replicas, or did not respond.
_UNAVAILABLE_CODES = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    }
)


def _settle(future: asyncio.Future[Delivery | Any], error: Any, message: Any) -> None:
    """Resolve a produce future on the event loop with a Delivery or a KafkaError."""
    if future.done():
        return  # the request was cancelled: the client went away
    if error is not None:
        future.set_result(error)
        return
    latency = message.latency()
    future.set_result(
        Delivery(message.topic(), message.partition(), message.offset(), latency or 0.0)
    )
