"""Live results fan-out: one Kafka consumer per process, many WebSocket clients.

``LiveConsumer`` reads every ``results.<line>`` topic on its own thread. It
assigns partitions by hand under a group id unique to this process instance,
so it never joins a consumer group, never rebalances and commits nothing.
Every edge instance therefore receives every result. Topics present at start
are read from their end. A topic or partition that appears later is read from its
beginning, because everything in it was produced after this process started.

``LiveHub`` hands each batch to every matching ``Subscription`` on the event
loop. A subscription holds a bounded queue: when it is full, the oldest
message is dropped and counted, and the client is told the count just before
the next message it receives. A slow client therefore costs one bounded queue
and never blocks the consumer or the other clients. The consumer thread waits
only until the loop has queued its batch, so the loop's own CPU time is the
only thing that paces it.

``LiveSession`` serves one client: a hello, the backfill of ``since=`` from
the store (plus recent results the sink may not have stored yet), then live
results and heartbeats. Message formats and close codes are listed in
docs/results.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from pipeline.errors import FaultlineError
from pipeline.kafka import consumer_config
from pipeline.metrics import EdgeMetrics
from pipeline.queries import Backfill
from pipeline.settings import Settings
from pipeline.topics import (
    RESULTS_PREFIX,
    format_position,
    line_of_topic,
    topic_pattern,
)
from schemas import ResultRecord

log = logging.getLogger(__name__)

# The consumer hands over at most this many results at once, and at most a
# quarter of a client queue, so that a client that keeps up always has room
# for the next batch.
MAX_CONSUME_BATCH_MESSAGES = 256
CONSUME_TIMEOUT_S = 0.2
# A writer yields to the event loop after this many sends in a row, so one
# busy client cannot hold the loop while its transport keeps accepting data.
SENDS_PER_YIELD = 64
# How long backfilled frame ids stay in a session's duplicate filter: longer
# than the sink's insert delay, so a live copy of a backfilled result that
# arrives late is still recognised.
BACKFILL_DEDUP_S = 60.0
WARNING_INTERVAL_S = 10.0


class CloseCode(IntEnum):
    """WebSocket close codes the live feed sends."""

    GOING_AWAY = 1001
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    INVALID_REQUEST = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403


class HubFullError(FaultlineError):
    """The edge already serves its maximum number of WebSocket clients."""


@dataclass(frozen=True)
class LiveOptions:
    """Limits of the live feed; ``faultline serve`` sets them from flags."""

    queue_messages: int = 1024
    """Messages one client may have waiting before the oldest are dropped."""
    heartbeat_s: float = 10.0
    """Seconds without a message after which a client gets a heartbeat."""
    max_clients: int = 1000
    """Connected clients at most; more are closed with code 1013."""
    backfill_max_results: int = 5000
    """Most results one ``since=`` backfill sends; older ones count as missed."""
    recent_messages: int = 5000
    """Recent live results kept in memory to cover the sink's insert delay."""

    def __post_init__(self) -> None:
        for name in (
            "queue_messages",
            "max_clients",
            "backfill_max_results",
            "recent_messages",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"invalid {name}={getattr(self, name)}: use 1 or more")
        if self.heartbeat_s <= 0:
            raise ValueError(
                f"invalid heartbeat_s={self.heartbeat_s}: use a positive number"
            )


@dataclass(frozen=True, slots=True)
class LiveMessage:
    """One result, with its WebSocket message text built once for all clients."""

    line: str
    verdict: str
    run_id: str
    frame_id: str
    inferred_at_ns: int
    text: str


def result_message(record_json: str, backfill: bool = False) -> str:
    """Wrap a result record's JSON text into a ``result`` message."""
    flag = '"backfill":true,' if backfill else ""
    return '{"type":"result",' + flag + '"result":' + record_json + "}"


def live_message(
    record: ResultRecord, record_json: str, backfill: bool = False
) -> LiveMessage:
    return LiveMessage(
        line=record.line_id,
        verdict=record.verdict,
        run_id=record.run_id,
        frame_id=record.frame_id,
        inferred_at_ns=record.inferred_at_ns,
        text=result_message(record_json, backfill),
    )


@dataclass(frozen=True)
class LiveFilter:
    """The lines, verdict and run of one client; ``lines`` None is every line."""

    lines: frozenset[str] | None
    verdict: str | None
    run_id: str = ""

    def matches(self, message: LiveMessage) -> bool:
        if self.lines is not None and message.line not in self.lines:
            return False
        if self.verdict is not None and message.verdict != self.verdict:
            return False
        return message.run_id == self.run_id


class Subscription:
    """One client's filter and bounded queue; used on the event loop only."""

    def __init__(
        self,
        live_filter: LiveFilter,
        queue_messages: int,
        permits: Callable[[str], bool] | None = None,
    ) -> None:
        self.filter = live_filter
        self.permits = permits
        self.queue: deque[LiveMessage] = deque(maxlen=queue_messages)
        self.missed_pending = 0
        self.missed_total = 0
        self.wake = asyncio.Event()

    def wants(self, message: LiveMessage) -> bool:
        if not self.filter.matches(message):
            return False
        return self.permits is None or self.permits(message.line)

    def offer(self, message: LiveMessage) -> LiveMessage | None:
        """Queue ``message``; return the oldest message if it was dropped for it."""
        dropped = None
        if len(self.queue) == self.queue.maxlen:
            dropped = self.queue[0]
            self.missed_pending += 1
            self.missed_total += 1
        self.queue.append(message)
        self.wake.set()
        return dropped


class LiveHub:
    """The subscriptions of one process and the recent results they share."""

    def __init__(self, options: LiveOptions, metrics: EdgeMetrics) -> None:
        self.options = options
        self.metrics = metrics
        self.subscriptions: set[Subscription] = set()
        self.recent: deque[LiveMessage] = deque(maxlen=options.recent_messages)
        self.seen_lines: set[str] = set()
        self.closing: tuple[CloseCode, str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        metrics.watch_queued(self.queued_messages)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the event loop that publish_from_thread() hands batches to."""
        self._loop = loop

    def subscribe(
        self, live_filter: LiveFilter, permits: Callable[[str], bool] | None = None
    ) -> Subscription:
        if len(self.subscriptions) >= self.options.max_clients:
            raise HubFullError(
                f"this edge already serves {self.options.max_clients} clients "
                "(faultline serve --max-clients)"
            )
        subscription = Subscription(live_filter, self.options.queue_messages, permits)
        self.subscriptions.add(subscription)
        self.metrics.clients.set(len(self.subscriptions))
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self.subscriptions.discard(subscription)
        self.metrics.clients.set(len(self.subscriptions))

    def publish(self, messages: Iterable[LiveMessage]) -> None:
        """Queue each message for every subscription that wants it (loop thread)."""
        for message in messages:
            self.recent.append(message)
            self.seen_lines.add(message.line)
            for subscription in self.subscriptions:
                if not subscription.wants(message):
                    continue
                dropped = subscription.offer(message)
                if dropped is not None:
                    self.metrics.dropped.labels(dropped.line).inc()

    def publish_from_thread(
        self, messages: list[LiveMessage], stop: threading.Event
    ) -> bool:
        """Hand a batch to the loop and wait until it is queued.

        Returns False, with the batch possibly unpublished, when ``stop`` is
        set or the loop is gone.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        queued = threading.Event()

        def publish_and_signal() -> None:
            try:
                self.publish(messages)
            finally:
                queued.set()

        try:
            loop.call_soon_threadsafe(publish_and_signal)
        except RuntimeError:  # the loop closed between the check and the call
            return False
        while not queued.wait(0.5):
            if stop.is_set() or loop.is_closed():
                return False
        return True

    def recent_since(
        self, subscription: Subscription, since_ns: int
    ) -> list[LiveMessage]:
        """Return recent results the subscription wants, inferred since since_ns."""
        return [
            message
            for message in self.recent
            if message.inferred_at_ns >= since_ns and subscription.wants(message)
        ]

    def queued_messages(self) -> int:
        return sum(len(subscription.queue) for subscription in list(self.subscriptions))

    def close(self, code: CloseCode, reason: str) -> None:
        """Make every session close with ``code`` (loop thread)."""
        self.closing = (code, reason)
        for subscription in self.subscriptions:
            subscription.wake.set()

    def close_from_thread(self, code: CloseCode, reason: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.close, code, reason)
            except RuntimeError:
                pass  # the loop closed meanwhile, and every session with it


class _RateLimitedWarning:
    """A warning logged at most once per interval, with the count suppressed since."""

    def __init__(self, interval_s: float = WARNING_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last = 0.0
        self._suppressed = 0

    def warn(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        if self._suppressed:
            message += " (%d similar warnings suppressed)"
            args = (*args, self._suppressed)
        log.warning(message, *args)
        self._last = now
        self._suppressed = 0


class LiveConsumer:
    """The one ``results.*`` consumer of a process; feeds a LiveHub."""

    def __init__(self, settings: Settings, hub: LiveHub, metrics: EdgeMetrics) -> None:
        self.settings = settings
        self.hub = hub
        self.metrics = metrics
        instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.group_id = f"faultline-edge-{instance}"
        self.ready = threading.Event()
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run_logged, name="live-consumer", daemon=True
        )
        # Every results.<line> topic, or those of FAULTLINE_LINES when it is set.
        self._topics = re.compile(topic_pattern(RESULTS_PREFIX, settings.line_ids))
        self._assigned: set[tuple[str, int]] = set()
        self._first_listing = True
        self._errors = _RateLimitedWarning()
        self._rejects = _RateLimitedWarning()
        self._batch_messages = max(
            1, min(MAX_CONSUME_BATCH_MESSAGES, hub.options.queue_messages // 4)
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception as exc:  # the feed is dead: tell clients, keep the reason
            log.exception("live results consumer failed")
            self.failure = f"live results consumer failed: {exc}"
            self.ready.clear()
            self.hub.close_from_thread(
                CloseCode.INTERNAL_ERROR, "live results feed failed"
            )

    def run(self) -> None:
        from confluent_kafka import Consumer

        config = consumer_config(
            self.settings, self.group_id, **{"auto.offset.reset": "latest"}
        )
        consumer = Consumer(config)
        log.info("live consumer %s started on %s", self.group_id, self._topics.pattern)
        try:
            refresh_at = 0.0
            while not self._stop.is_set():
                if time.monotonic() >= refresh_at:
                    self._refresh_assignment(consumer)
                    refresh_at = time.monotonic() + self.settings.metadata_max_age_s
                messages = consumer.consume(self._batch_messages, CONSUME_TIMEOUT_S)
                batch = self._live_messages(messages)
                if batch and not self.hub.publish_from_thread(batch, self._stop):
                    break
        finally:
            consumer.close()
            log.info("live consumer %s stopped", self.group_id)

    def _refresh_assignment(self, consumer: Any) -> None:
        """Assign results partitions that appeared since the last listing."""
        from confluent_kafka import (
            OFFSET_BEGINNING,
            OFFSET_END,
            KafkaException,
            TopicPartition,
        )

        try:
            metadata = consumer.list_topics(timeout=10)
        except KafkaException as exc:
            self._errors.warn(
                "live consumer cannot list topics at %s: %s",
                self.settings.bootstrap_servers,
                exc,
            )
            return
        start = OFFSET_END if self._first_listing else OFFSET_BEGINNING
        new = []
        for name, topic in metadata.topics.items():
            if topic.error is not None or not self._topics.match(name):
                continue
            for partition in topic.partitions:
                if (name, partition) not in self._assigned:
                    new.append(TopicPartition(name, partition, start))
                    self._assigned.add((name, partition))
        if new:
            consumer.incremental_assign(new)
            log.info(
                "live consumer assigned %d partitions from their %s",
                len(new),
                "end" if self._first_listing else "beginning",
            )
        self._first_listing = False
        self.ready.set()

    def _live_messages(self, messages: list[Any]) -> list[LiveMessage]:
        batch = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise RuntimeError(f"fatal Kafka error: {error}")
                self._errors.warn("live consumer error: %s", error)
                continue
            parsed = self._parse(message)
            if parsed is not None:
                batch.append(parsed)
        return batch

    def _parse(self, message: Any) -> LiveMessage | None:
        topic, partition, offset = (
            message.topic(),
            message.partition(),
            message.offset(),
        )
        try:
            payload = message.value() or b""
            record = ResultRecord.from_json(payload)
            line = line_of_topic(topic)
            if record.line_id != line:
                raise ValueError(
                    f"record line_id {record.line_id!r} does not match the topic"
                )
            text = payload.decode("utf-8")
        except (ValueError, TypeError, KeyError, AttributeError, FaultlineError) as exc:
            # Not a result record of the current schema, or on the wrong topic.
            self.metrics.rejected.inc()
            self._rejects.warn(
                "live feed skipped result %s: %s",
                format_position(topic, partition, offset),
                exc,
            )
            return None
        self.metrics.consumed.labels(line).inc()
        return live_message(record, text)


BackfillLoader = Callable[[], Awaitable[Backfill]]
Sender = Callable[[str], Awaitable[None]]


@dataclass
class LiveSession:
    """One WebSocket client of the live feed, after it passed the checks.

    ``send`` sends one text message; ``receive`` returns the next incoming
    ASGI event. ``backfill`` loads the results of ``since=`` from the store.
    """

    hub: LiveHub
    subscription: Subscription
    send: Sender
    receive: Callable[[], Awaitable[Mapping[str, Any]]]
    close: Callable[[int, str], Awaitable[None]]
    since_ns: int | None = None
    backfill: BackfillLoader | None = None
    _skip: set[str] = field(default_factory=set, init=False)
    _skip_until: float = field(default=0.0, init=False)

    async def run(self) -> None:
        """Serve until the client leaves or the hub closes; always unsubscribes."""
        reader = asyncio.create_task(self._read_until_disconnect())
        writer = asyncio.create_task(self._write())
        try:
            done, _ = await asyncio.wait(
                {reader, writer}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is writer and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            reader.cancel()
            writer.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            self.hub.unsubscribe(self.subscription)

    async def _read_until_disconnect(self) -> None:
        # The feed defines no client messages. Any that arrive are read and
        # ignored, so that a disconnect is noticed even while nothing is sent.
        while True:
            event = await self.receive()
            if event.get("type") == "websocket.disconnect":
                return

    async def _write(self) -> None:
        live_filter = self.subscription.filter
        lines = sorted(live_filter.lines) if live_filter.lines is not None else None
        await self.send(json.dumps({
            "type": "hello",
            "lines": lines,
            "verdict": live_filter.verdict,
            "run_id": live_filter.run_id,
            "queue_messages": self.hub.options.queue_messages,
            "heartbeat_s": self.hub.options.heartbeat_s,
        }))  # fmt: skip
        if self.since_ns is not None:
            await self._send_backfill(self.since_ns)
        await self._stream()

    async def _send_backfill(self, since_ns: int) -> None:
        stored = Backfill([], 0)
        if self.backfill is not None:
            stored = await self.backfill()
        merged = self._merge_backfill(stored, since_ns)
        ordered = sorted(merged.values(), key=lambda m: (m.inferred_at_ns, m.frame_id))
        limit = self.hub.options.backfill_max_results
        left_out = stored.left_out + max(0, len(ordered) - limit)
        ordered = ordered[-limit:]

        if left_out:
            self.subscription.missed_total += left_out
            total = self.subscription.missed_total
            await self.send(
                json.dumps({"type": "missed", "count": left_out, "total": total})
            )
        for index, message in enumerate(ordered, start=1):
            await self.send(message.text)
            self.hub.metrics.sent.labels(message.line).inc()
            if index % SENDS_PER_YIELD == 0:
                await asyncio.sleep(0)

        self._skip = set(merged)
        self._skip_until = time.monotonic() + BACKFILL_DEDUP_S
        await self.send(
            json.dumps(
                {"type": "backfill", "results": len(ordered), "missed": left_out}
            )
        )

    def _merge_backfill(
        self, stored: Backfill, since_ns: int
    ) -> dict[str, LiveMessage]:
        """Return backfill messages by frame id: the stored results and recent ones."""
        merged: dict[str, LiveMessage] = {}
        for record in stored.results:
            merged[record.frame_id] = live_message(
                record, record.to_json().decode(), backfill=True
            )
        # The sink inserts about once a second, so the newest results may be
        # in the live feed but not in the store yet.
        for message in self.hub.recent_since(self.subscription, since_ns):
            if message.frame_id in merged:
                continue
            text = message.text.replace(
                '{"type":"result",', '{"type":"result","backfill":true,', 1
            )
            merged[message.frame_id] = dataclasses.replace(message, text=text)
        return merged

    async def _stream(self) -> None:
        subscription = self.subscription
        heartbeat_s = self.hub.options.heartbeat_s
        sent_in_row = 0
        while True:
            if self.hub.closing is not None:
                code, reason = self.hub.closing
                await self.close(int(code), reason)
                return
            if subscription.missed_pending:
                count, subscription.missed_pending = subscription.missed_pending, 0
                total = subscription.missed_total
                await self.send(
                    json.dumps({"type": "missed", "count": count, "total": total})
                )
                continue
            if not subscription.queue:
                subscription.wake.clear()
                sent_in_row = 0
                try:
                    await asyncio.wait_for(subscription.wake.wait(), heartbeat_s)
                except TimeoutError:
                    await self.send(json.dumps({
                        "type": "heartbeat",
                        "time_ms": time.time_ns() // 1_000_000,
                        "missed_total": subscription.missed_total,
                    }))  # fmt: skip
                continue
            message = subscription.queue.popleft()
            if self._skip and self._is_duplicate(message):
                continue
            await self.send(message.text)
            self.hub.metrics.sent.labels(message.line).inc()
            sent_in_row += 1
            if sent_in_row % SENDS_PER_YIELD == 0:
                await asyncio.sleep(0)

    def _is_duplicate(self, message: LiveMessage) -> bool:
        if time.monotonic() > self._skip_until:
            self._skip.clear()
            return False
        return message.frame_id in self._skip
