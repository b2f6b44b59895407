"""ResultStore against the real ClickHouse engine (chDB, or a server when
FAULTLINE_TEST_CLICKHOUSE_URL names one)."""

from __future__ import annotations

import time

import pytest

from pipeline.store import ResultStore
from schemas import Detection, ResultRecord, StageLatency

pytestmark = pytest.mark.integration


def record(frame_id: str, line: str = "line-1", offset: int = 0, captured_ns: int | None = None,
           detections: tuple[Detection, ...] = (), run_id: str = "") -> ResultRecord:
    captured = captured_ns if captured_ns is not None else time.time_ns()
    return ResultRecord(
        frame_id=frame_id, line_id=line, camera_id="cam-1", captured_at_ns=captured,
        ingested_at_ns=captured + 1_000_000, inferred_at_ns=captured + 50_000_000,
        model_name="pcb", model_version="1", image_width=640, image_height=640,
        detections=detections, verdict="fail" if detections else "pass",
        latency=StageLatency(0.01 * (offset + 1), 0.001, 0.04, 0.05 * (offset + 1), 4),
        source_topic=f"frames.{line}", source_partition=0, source_offset=offset, run_id=run_id,
    )


@pytest.fixture
def store(store_settings):  # type: ignore[no-untyped-def]
    store = ResultStore(store_settings)
    yield store
    store.close()


def test_same_token_adds_no_rows(store: ResultStore) -> None:
    batch = [record(f"f{i}", offset=i) for i in range(10)]
    store.insert_results(batch, "results.line-1[0]@0-9")
    store.insert_results(batch, "results.line-1[0]@0-9")
    assert store.count(final=False) == 10


def test_redelivered_frame_counted_once(store: ResultStore) -> None:
    captured = time.time_ns()
    store.insert_results([record("f1", captured_ns=captured)], "results.line-1[0]@0-0")
    store.insert_results([record("f1", captured_ns=captured)], "results.line-1[0]@5-5")
    assert store.count(final=False) == 2
    assert store.count() == 1
    assert store.summary().frames == 1


def test_summary_counts_classes_and_latency(store: ResultStore) -> None:
    short = Detection(1, "short", 0.9, 1, 2, 30, 40)
    spur = Detection(3, "spur", 0.8, 5, 5, 25, 25)
    store.insert_results(
        [
            record("a", detections=(short, spur)),
            record("b", offset=1, detections=(short,)),
            record("c", offset=2, line="line-2"),
        ],
        "t-1",
    )
    summary = store.summary()
    assert summary.frames == 3
    assert summary.failed_frames == 2
    assert summary.detections == 3
    assert summary.defects_per_class == {"short": 2, "spur": 1}
    assert summary.lines == {"line-1": 2, "line-2": 1}
    assert summary.latency_s["total"]["p50"] == pytest.approx(0.1, rel=0.05)
    assert store.summary(line="line-2").frames == 1


def test_results_keep_boxes_and_position(store: ResultStore) -> None:
    box = Detection(2, "mousebite", 0.75, 10.125, 20.5, 41.25, 60.0)
    store.insert_results([record("x", offset=41, detections=(box,))], "t-2")
    row = store.results_for(["x"])["x"]
    assert row["class_ids"] == [2]
    assert row["x1"] == [pytest.approx(10.125)]
    assert row["y2"] == [pytest.approx(60.0)]
    assert row["source_offset"] == 41
    assert row["source_topic"] == "frames.line-1"


def test_run_ids_kept_apart(store: ResultStore) -> None:
    captured = time.time_ns()
    store.insert_results([record("f", captured_ns=captured)], "t-3")
    store.insert_results([record("f", captured_ns=captured, run_id="replay-1")], "t-4")
    assert store.count() == 1
    assert store.count(run_id="replay-1") == 1


def test_minute_rollup_counts_frames_once(store: ResultStore) -> None:
    captured = time.time_ns()
    store.insert_results([record("f1", captured_ns=captured), record("f2", captured_ns=captured)], "t-5")
    store.insert_results([record("f1", captured_ns=captured)], "t-6")
    rows = store.query(
        f"SELECT uniqExactMerge(frames) FROM {store.database}.frame_results_minute "
        "WHERE line_id = {line:String}",
        {"line": "line-1"},
    )
    assert rows[0][0] == 2


def test_ttl_applies_to_old_rows(store_settings) -> None:  # type: ignore[no-untyped-def]
    settings = store_settings.model_copy(update={"result_ttl_days": 30})
    store = ResultStore(settings)
    try:
        day_ns = 86_400 * 10**9
        now = time.time_ns()
        store.insert_results([record("new", captured_ns=now - day_ns)], "t-7")
        store.insert_results([record("old", captured_ns=now - 40 * day_ns)], "t-8")
        store.command(f"OPTIMIZE TABLE {store.database}.frame_results FINAL")
        assert set(store.results_for(["new", "old"])) == {"new"}
    finally:
        store.close()
