"""The ClickHouse sink: ``results.*`` in, batched inserts out.

Offsets are committed only after the insert returned. A batch closes at
``sink_batch_rows`` rows or ``sink_batch_timeout_s`` seconds, whichever comes
first, and goes in as one insert per topic partition, each with the token
``<topic>[<partition>]@<first>-<last>``. A batch retried after a crash or a
failed insert therefore carries the same token for the same offsets and adds
no rows. Before partitions are revoked in a rebalance, the sink flushes and
commits what it holds, so the next owner starts after it.

A result record that is not valid JSON of the current schema cannot be
stored; it is logged with its position, counted in ``rejected`` and its
offset committed, since retrying would never succeed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import StoreError
from pipeline.kafka import consumer_config
from pipeline.settings import Settings
from pipeline.store import ResultStore
from pipeline.topics import RESULTS_PREFIX, format_position, topic_pattern
from schemas import ResultRecord

log = logging.getLogger(__name__)

INSERT_RETRY_S = 2.0


@dataclass
class SinkStats:
    consumed: int = 0
    inserted: int = 0
    rejected: int = 0
    batches: int = 0
    last_insert_at: float = 0.0


@dataclass
class _Pending:
    records: dict[tuple[str, int], list[ResultRecord]] = field(default_factory=lambda: defaultdict(list))
    first: dict[tuple[str, int], int] = field(default_factory=dict)
    last: dict[tuple[str, int], int] = field(default_factory=dict)
    rows: int = 0
    opened_at: float = 0.0

    def add(self, topic: str, partition: int, offset: int, record: ResultRecord | None) -> None:
        key = (topic, partition)
        if key not in self.first:
            self.first[key] = offset
        self.last[key] = offset
        if record is not None:
            self.records[key].append(record)
            self.rows += 1
        if not self.opened_at:
            self.opened_at = time.monotonic()

    def clear(self) -> None:
        self.records.clear()
        self.first.clear()
        self.last.clear()
        self.rows = 0
        self.opened_at = 0.0


def dedup_token(topic: str, partition: int, first: int, last: int) -> str:
    return f"{format_position(topic, partition, first)}-{last}"


class ResultSink:
    """Consume results and store them; run ``run()`` on its own thread."""

    def __init__(self, settings: Settings, store: ResultStore) -> None:
        self.settings = settings
        self.store = store
        self.stats = SinkStats()
        self._pending = _Pending()
        self._stop = threading.Event()
        self._consumer: Any = None
        self.ready = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        from confluent_kafka import Consumer

        config = consumer_config(self.settings, self.settings.sink_group_id)
        self._consumer = Consumer(config)
        pattern = topic_pattern(RESULTS_PREFIX, self.settings.line_ids)
        self._consumer.subscribe([pattern], on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info("sink started: %s -> %s", pattern, self.store.url)
        try:
            while not self._stop.is_set():
                self._poll_once()
            self._flush()
        finally:
            self._consumer.close()
            log.info("sink stopped: %d rows inserted, %d rejected", self.stats.inserted, self.stats.rejected)

    def _poll_once(self) -> None:
        wait = self.settings.sink_batch_timeout_s
        if self._pending.opened_at:
            wait = max(0.0, self._pending.opened_at + wait - time.monotonic())
        messages = self._consumer.consume(
            num_messages=max(1, self.settings.sink_batch_rows - self._pending.rows),
            timeout=min(wait, 0.5),
        )
        for message in messages:
            if message.error():
                log.warning("sink consumer error: %s", message.error())
                continue
            self._accept(message)
        if self._due():
            self._flush()

    def _accept(self, message: Any) -> None:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        self.stats.consumed += 1
        try:
            record = ResultRecord.from_json(message.value())
        except Exception as exc:
            self.stats.rejected += 1
            log.warning("rejected result %s: %s", format_position(topic, partition, offset), exc)
            record = None
        self._pending.add(topic, partition, offset, record)

    def _due(self) -> bool:
        pending = self._pending
        if not pending.first:
            return False
        if pending.rows >= self.settings.sink_batch_rows:
            return True
        return time.monotonic() - pending.opened_at >= self.settings.sink_batch_timeout_s

    def _flush(self) -> None:
        """Insert what is pending, then commit its offsets; retries until done."""
        from confluent_kafka import TopicPartition

        pending = self._pending
        if not pending.first:
            return
        for key, records in pending.records.items():
            token = dedup_token(key[0], key[1], pending.first[key], pending.last[key])
            self._insert_with_retry(records, token)
        offsets = [TopicPartition(t, p, last + 1) for (t, p), last in pending.last.items()]
        self._consumer.commit(offsets=offsets, asynchronous=False)
        self.stats.batches += 1
        self.stats.inserted += pending.rows
        self.stats.last_insert_at = time.time()
        log.debug("sink inserted %d rows, committed %d partitions", pending.rows, len(offsets))
        pending.clear()

    def _insert_with_retry(self, records: list[ResultRecord], token: str) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                self.store.insert_results(records, token)
                return
            except StoreError as exc:
                log.warning("insert %s failed (attempt %d): %s; retrying", token, attempt, exc)
                if self._stop.wait(INSERT_RETRY_S) and attempt >= 3:
                    raise

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        log.info("sink assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))
        self.ready.set()

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        log.info("sink revoked %s; flushing first", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))
        self._flush()
