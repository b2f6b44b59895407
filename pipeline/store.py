"""ClickHouse store: schema, inserts with deduplication tokens, summaries.

One code path serves chDB (``chdb:///path``, the engine inside this process)
and a ClickHouse server (``http://host:8123``): the same DDL, the same
parameterised queries. chDB allows one engine per process and one process
per data path, so the process that owns a chDB path (``faultline sink`` or
``faultline serve``) also runs the queries.

``frame_results`` is a ReplacingMergeTree ordered by line, camera, capture
time, frame id and run id. Redelivered results (at-least-once) collapse on
merge, and every count below reads with ``FINAL`` so it is exact before the
merge too. Retried inserts of the same offsets carry the same
``insert_deduplication_token`` and add no rows at all.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError, StoreError
from pipeline.settings import Settings
from schemas import ResultRecord

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "line_id", "camera_id", "captured_at", "frame_id", "run_id",
    "ingested_at", "inferred_at", "model_name", "model_version",
    "image_width", "image_height", "verdict", "detection_count",
    "class_ids", "class_names", "confidences", "x1", "y1", "x2", "y2",
    "queue_s", "decode_s", "inference_s", "total_s", "batch_size",
    "source_topic", "source_partition", "source_offset", "trace_id",
)  # fmt: skip

STAGES = ("queue_s", "decode_s", "inference_s", "total_s")


def schema_statements(database: str, ttl_days: int) -> list[str]:
    ttl = f"TTL toDateTime(captured_at) + INTERVAL {int(ttl_days)} DAY" if ttl_days else ""
    return [
        f"CREATE DATABASE IF NOT EXISTS {database}",
        f"""
        CREATE TABLE IF NOT EXISTS {database}.frame_results (
            line_id LowCardinality(String),
            camera_id LowCardinality(String),
            captured_at DateTime64(9, 'UTC'),
            frame_id String,
            run_id LowCardinality(String),
            ingested_at DateTime64(9, 'UTC'),
            inferred_at DateTime64(9, 'UTC'),
            model_name LowCardinality(String),
            model_version LowCardinality(String),
            image_width UInt32,
            image_height UInt32,
            verdict Enum8('pass' = 0, 'fail' = 1),
            detection_count UInt16,
            class_ids Array(UInt16),
            class_names Array(LowCardinality(String)),
            confidences Array(Float32),
            x1 Array(Float32),
            y1 Array(Float32),
            x2 Array(Float32),
            y2 Array(Float32),
            queue_s Float32,
            decode_s Float32,
            inference_s Float32,
            total_s Float32,
            batch_size UInt16,
            source_topic LowCardinality(String),
            source_partition UInt32,
            source_offset UInt64,
            trace_id String,
            stored_at DateTime64(3, 'UTC') DEFAULT now64(3)
        )
        ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(captured_at)
        ORDER BY (line_id, camera_id, captured_at, frame_id, run_id)
        {ttl}
        SETTINGS non_replicated_deduplication_window = 10000
        """,
        # Per-minute rollup for dashboards. Frame counts are exact under
        # redelivery (uniqExact of frame ids); detection sums count a
        # redelivered frame twice until the source rows merge.
        f"""
        CREATE TABLE IF NOT EXISTS {database}.frame_results_minute (
            line_id LowCardinality(String),
            minute DateTime('UTC'),
            run_id LowCardinality(String),
            model_name LowCardinality(String),
            frames AggregateFunction(uniqExact, String),
            failed_frames AggregateFunction(uniqExactIf, String, UInt8),
            detections SimpleAggregateFunction(sum, UInt64),
            total_s AggregateFunction(quantiles(0.5, 0.95), Float32)
        )
        ENGINE = AggregatingMergeTree
        ORDER BY (line_id, minute, run_id, model_name)
        {ttl.replace('toDateTime(captured_at)', 'minute')}
        """,
        f"""
        CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.frame_results_minute_mv
        TO {database}.frame_results_minute AS
        SELECT
            line_id,
            toStartOfMinute(captured_at) AS minute,
            run_id,
            model_name,
            uniqExactState(frame_id) AS frames,
            uniqExactIfState(frame_id, verdict = 'fail') AS failed_frames,
            toUInt64(sum(detection_count)) AS detections,
            quantilesState(0.5, 0.95)(total_s) AS total_s
        FROM {database}.frame_results
        GROUP BY line_id, minute, run_id, model_name
        """,
    ]


def result_row(record: ResultRecord) -> list[Any]:
    detections = record.detections
    latency = record.latency
    return [
        record.line_id, record.camera_id, record.captured_at_ns, record.frame_id,
        record.run_id, record.ingested_at_ns, record.inferred_at_ns,
        record.model_name, record.model_version, record.image_width,
        record.image_height, record.verdict, len(detections),
        [d.class_id for d in detections], [d.class_name for d in detections],
        [d.confidence for d in detections], [d.x1 for d in detections],
        [d.y1 for d in detections], [d.x2 for d in detections],
        [d.y2 for d in detections], latency.queue_s, latency.decode_s,
        latency.inference_s, latency.total_s, latency.batch_size,
        record.source_topic, record.source_partition, record.source_offset,
        record.trace_id,
    ]  # fmt: skip


@dataclass(frozen=True)
class Summary:
    frames: int
    failed_frames: int
    detections: int
    lines: dict[str, int]
    defects_per_class: dict[str, int]
    latency_s: dict[str, dict[str, float]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "failed_frames": self.failed_frames,
            "detections": self.detections,
            "lines": self.lines,
            "defects_per_class": self.defects_per_class,
            "latency_s": self.latency_s,
        }


class ResultStore:
    """A ClickHouse client plus Faultline's schema and queries."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database = settings.clickhouse_database
        self.url = settings.store_url
        self._client = self._connect()
        self._lock = threading.Lock()
        self.ensure_schema()

    def _connect(self) -> Any:
        import clickhouse_connect

        url = self.url
        try:
            if url.startswith("chdb://"):
                path = url[len("chdb://") :]
                if path and path != "memory":
                    from pathlib import Path

                    Path(path).mkdir(parents=True, exist_ok=True)
                return clickhouse_connect.get_client(dsn=url)
            if url.startswith(("http://", "https://")):
                return clickhouse_connect.get_client(
                    dsn=url,
                    username=self.settings.clickhouse_user,
                    password=self.settings.clickhouse_password.get_secret_value(),
                )
        except Exception as exc:
            raise StoreError(f"connecting to ClickHouse at {url!r} failed: {exc}") from exc
        raise ConfigError(
            f"FAULTLINE_CLICKHOUSE_URL {url!r} is invalid: use chdb:///abs/path "
            "or http://host:8123"
        )

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with self._lock:
            try:
                return self._client.command(sql, parameters=parameters)
            except Exception as exc:
                raise StoreError(f"ClickHouse statement failed: {exc}") from exc

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple]:
        with self._lock:
            try:
                return self._client.query(sql, parameters=parameters).result_rows
            except Exception as exc:
                raise StoreError(f"ClickHouse query failed: {exc}") from exc

    def ensure_schema(self) -> None:
        for statement in schema_statements(self.database, self.settings.result_ttl_days):
            self.command(statement)

    def insert_results(self, records: Sequence[ResultRecord], dedup_token: str) -> None:
        """Insert one batch; a retry with the same token adds no rows."""
        if not records:
            return
        rows = [result_row(r) for r in records]
        with self._lock:
            try:
                self._client.insert(
                    f"{self.database}.frame_results",
                    rows,
                    column_names=RESULT_COLUMNS,
                    settings={"insert_deduplication_token": dedup_token},
                )
            except Exception as exc:
                raise StoreError(
                    f"inserting {len(rows)} rows (token {dedup_token}) failed: {exc}"
                ) from exc

    def summary(self, line: str | None = None, run_id: str = "") -> Summary:
        """Frames, failures, defects per class and latency percentiles."""
        where = "run_id = {run:String}" + (" AND line_id = {line:String}" if line else "")
        params = {"run": run_id, "line": line or ""}
        table = f"{self.database}.frame_results FINAL"
        totals = self.query(
            f"SELECT count(), countIf(verdict = 'fail'), sum(detection_count) "
            f"FROM {table} WHERE {where}",
            params,
        )[0]
        lines = dict(self.query(
            f"SELECT line_id, count() FROM {table} WHERE {where} GROUP BY line_id ORDER BY line_id",
            params,
        ))
        classes = dict(self.query(
            f"SELECT name, count() FROM {table} ARRAY JOIN class_names AS name "
            f"WHERE {where} GROUP BY name ORDER BY count() DESC, name",
            params,
        ))
        quantiles = ", ".join(f"quantiles(0.5, 0.95)({stage})" for stage in STAGES)
        latency_row = self.query(f"SELECT {quantiles} FROM {table} WHERE {where}", params)[0]
        # quantiles() over no rows returns NaN, which is not valid JSON.
        latency = {
            stage.removesuffix("_s"): {"p50": float(values[0]), "p95": float(values[1])}
            for stage, values in zip(STAGES, latency_row, strict=True)
            if values and not any(math.isnan(v) for v in values)
        }
        return Summary(
            frames=int(totals[0]),
            failed_frames=int(totals[1]),
            detections=int(totals[2] or 0),
            lines={str(k): int(v) for k, v in lines.items()},
            defects_per_class={str(k): int(v) for k, v in classes.items()},
            latency_s=latency,
        )

    def results_for(self, frame_ids: Iterable[str], run_id: str = "") -> dict[str, dict[str, Any]]:
        """Stored rows by frame id, with detections as lists."""
        rows = self.query(
            f"SELECT frame_id, line_id, verdict, class_ids, confidences, x1, y1, x2, y2, "
            f"source_topic, source_partition, source_offset "
            f"FROM {self.database}.frame_results FINAL "
            f"WHERE run_id = {{run:String}} AND frame_id IN {{ids:Array(String)}}",
            {"run": run_id, "ids": list(frame_ids)},
        )
        keys = ("frame_id", "line_id", "verdict", "class_ids", "confidences", "x1", "y1", "x2", "y2",
                "source_topic", "source_partition", "source_offset")
        return {row[0]: dict(zip(keys, row, strict=True)) for row in rows}

    def count(self, run_id: str = "", line: str | None = None, final: bool = True) -> int:
        where = "run_id = {run:String}" + (" AND line_id = {line:String}" if line else "")
        final_sql = " FINAL" if final else ""
        return int(self.query(
            f"SELECT count() FROM {self.database}.frame_results{final_sql} WHERE {where}",
            {"run": run_id, "line": line or ""},
        )[0][0])

    def close(self) -> None:
        with self._lock:
            try:
                self._client.close()
            except Exception as exc:  # closing must not mask the caller's error
                log.warning("closing the ClickHouse client failed: %s", exc)
