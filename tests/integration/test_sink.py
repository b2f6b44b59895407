"""The sink against real Kafka and the real ClickHouse engine."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from confluent_kafka import Producer

from pipeline.errors import StoreError
from pipeline.kafka import ensure_line_topics, producer_config
from pipeline.sink import ResultSink, dedup_token
from pipeline.store import ResultStore
from pipeline.topics import results_topic
from tests.integration.test_store import record

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(store_settings, kafka_bootstrap, line_id):  # type: ignore[no-untyped-def]
    settings = store_settings.model_copy(
        update={
            "bootstrap_servers": kafka_bootstrap,
            "lines": line_id,
            "sink_group_id": f"sink-{uuid.uuid4().hex[:8]}",
            "sink_batch_timeout_s": 0.3,
            "sink_batch_rows": 25,
        }
    )
    ensure_line_topics(settings, line_id)
    return settings


def produce(settings, line: str, start: int, count: int) -> None:  # type: ignore[no-untyped-def]
    producer = Producer(producer_config(settings))
    for i in range(start, start + count):
        producer.produce(results_topic(line), key=b"cam-1", value=record(f"f{i}", line=line, offset=i).to_json())
    assert producer.flush(30) == 0


class FlakyStore(ResultStore):
    """A real store whose first inserts fail, as a server restart would."""

    failures = 2

    def insert_results(self, records, dedup_token):  # type: ignore[no-untyped-def]
        if self.failures:
            self.failures -= 1
            raise StoreError("injected insert failure")
        super().insert_results(records, dedup_token)


def run_sink(sink: ResultSink) -> threading.Thread:
    thread = threading.Thread(target=sink.run, daemon=True)
    thread.start()
    return thread


def wait_for(store: ResultStore, line: str, expected: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    count = 0
    while time.monotonic() < deadline:
        count = store.count(line=line, final=False)
        if count >= expected:
            return count
        time.sleep(0.3)
    return count


def test_sink_stores_every_result(settings, line_id) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(settings)
    sink = ResultSink(settings, store)
    thread = run_sink(sink)
    try:
        produce(settings, line_id, 0, 120)
        assert wait_for(store, line_id, 120) == 120
    finally:
        sink.stop()
        thread.join(30)
    assert sink.stats.inserted == 120
    assert sink.stats.batches >= 120 // 25
    store.close()


def test_sink_resumes_after_committed_offsets(settings, line_id) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(settings)
    produce(settings, line_id, 0, 40)
    first = ResultSink(settings, store)
    thread = run_sink(first)
    assert wait_for(store, line_id, 40) == 40
    first.stop()
    thread.join(30)

    produce(settings, line_id, 40, 40)
    second = ResultSink(settings, store)
    thread = run_sink(second)
    try:
        assert wait_for(store, line_id, 80) == 80
        time.sleep(1.0)
        assert store.count(line=line_id, final=False) == 80
    finally:
        second.stop()
        thread.join(30)
    assert second.stats.consumed == 40
    store.close()


def test_failed_insert_retried_without_loss(settings, line_id) -> None:  # type: ignore[no-untyped-def]
    store = FlakyStore(settings)
    sink = ResultSink(settings, store)
    thread = run_sink(sink)
    try:
        produce(settings, line_id, 0, 30)
        assert wait_for(store, line_id, 30) == 30
    finally:
        sink.stop()
        thread.join(30)
    assert store.failures == 0
    assert store.count(line=line_id, final=False) == 30
    store.close()


def test_invalid_result_rejected_and_counted(settings, line_id) -> None:  # type: ignore[no-untyped-def]
    store = ResultStore(settings)
    producer = Producer(producer_config(settings))
    producer.produce(results_topic(line_id), value=b"{not json")
    assert producer.flush(30) == 0
    produce(settings, line_id, 0, 5)
    sink = ResultSink(settings, store)
    thread = run_sink(sink)
    try:
        assert wait_for(store, line_id, 5) == 5
    finally:
        sink.stop()
        thread.join(30)
    assert sink.stats.rejected == 1
    store.close()


def test_dedup_token_format() -> None:
    assert dedup_token("results.l", 2, 10, 19) == "results.l[2]@10-19"
