"""Analytics queries of the results edge, all with bound parameters.

Every value that comes from a request travels as a ClickHouse query parameter
(``{name:Type}``). The SQL text is assembled only from fixed fragments of this
module and the validated database name. The same statements run on chDB and
on a ClickHouse server.

Reads of ``frame_results`` use ``FINAL``, so a result delivered twice counts
once even before the ReplacingMergeTree merged it. The defect rate per minute
reads the ``frame_results_minute`` rollup instead, whose frame counts are
exact under redelivery too.

Times in and out are epoch nanoseconds (``*_ns``), except minute buckets,
which are epoch seconds of the bucket start. A range is half-open: start
included, end excluded.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import ConfigError
from pipeline.store import ResultStore
from schemas import Detection, ResultRecord, StageLatency

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000
DEFAULT_RANGE_S = 3600
MAX_PAGE_RESULTS = 1000
MAX_TOP_CLASSES = 100
LATENCY_LEVELS = (0.5, 0.9, 0.95, 0.99)
LATENCY_STAGES = ("queue_s", "decode_s", "inference_s", "total_s")

# Columns of one stored result, in the order record_from_row() reads them.
_RECORD_COLUMNS = """
    frame_id, line_id, camera_id,
    toUnixTimestamp64Nano(captured_at), toUnixTimestamp64Nano(ingested_at),
    toUnixTimestamp64Nano(inferred_at), model_name, model_version,
    image_width, image_height, class_ids, class_names, confidences,
    x1, y1, x2, y2, toString(verdict), queue_s, decode_s, inference_s, total_s,
    batch_size, source_topic, source_partition, source_offset, run_id, trace_id
"""
_CAPTURED_IN_RANGE = (
    "captured_at >= fromUnixTimestamp64Nano({start_ns:Int64}) "
    "AND captured_at < fromUnixTimestamp64Nano({end_ns:Int64})"
)
_LINES_FILTER = " AND line_id IN {lines:Array(String)}"
_VERDICT_FILTER = " AND verdict = {verdict:String}"


def parse_time_ns(value: str, name: str) -> int:
    """Parse epoch milliseconds or an ISO 8601 time into epoch nanoseconds.

    An ISO time without a UTC offset is read as UTC.
    """
    text = value.strip()
    if text.lstrip("-").isdigit():
        return int(text) * NS_PER_MS
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{name}={value!r} is invalid: use epoch milliseconds or an ISO 8601 "
            "time such as 2025-01-31T12:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * NS_PER_S + delta.microseconds * 1000


@dataclass(frozen=True)
class TimeRange:
    """A half-open range of capture times in epoch nanoseconds."""

    start_ns: int
    end_ns: int

    @classmethod
    def parse(cls, start: str | None, end: str | None) -> TimeRange:
        """Build a range from request values; the default is the last hour."""
        end_ns = parse_time_ns(end, "end") if end else time.time_ns()
        start_ns = (
            parse_time_ns(start, "start")
            if start
            else end_ns - DEFAULT_RANGE_S * NS_PER_S
        )
        if start_ns >= end_ns:
            raise ConfigError(f"start ({start_ns} ns) must be before end ({end_ns} ns)")
        return cls(start_ns, end_ns)

    def params(self) -> dict[str, Any]:
        return {"start_ns": self.start_ns, "end_ns": self.end_ns}


def encode_cursor(captured_at_ns: int, frame_id: str) -> str:
    """Build the opaque page cursor that points after one result."""
    raw = json.dumps([captured_at_ns, frame_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """Return (captured_at_ns, frame_id) of a cursor made by encode_cursor()."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        captured_at_ns, frame_id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(captured_at_ns, int) or not isinstance(frame_id, str):
            raise TypeError("cursor fields have the wrong types")
    except (binascii.Error, ValueError, TypeError):
        raise ConfigError(
            f"cursor {cursor[:40]!r} is invalid: pass the previous page's "
            "next_cursor as is"
        ) from None
    return captured_at_ns, frame_id


def _float32(value: float) -> float:
    # Float32 columns come back widened to float64 (0.9 reads 0.8999999762);
    # 7 significant digits are what Float32 holds.
    return float(f"{value:.7g}")


def record_from_row(row: Sequence[Any]) -> ResultRecord:
    """Rebuild a result record from a row of the record columns."""
    (frame_id, line_id, camera_id, captured, ingested, inferred, model_name,
     model_version, width, height, class_ids, class_names, confidences,
     x1, y1, x2, y2, verdict, queue_s, decode_s, inference_s, total_s,
     batch_size, topic, partition, offset, run_id, trace_id) = row  # fmt: skip
    detections = tuple(
        Detection(
            class_id=int(class_id),
            class_name=str(name),
            confidence=_float32(confidence),
            x1=_float32(left),
            y1=_float32(top),
            x2=_float32(right),
            y2=_float32(bottom),
        )
        for class_id, name, confidence, left, top, right, bottom in zip(
            class_ids, class_names, confidences, x1, y1, x2, y2, strict=True
        )
    )
    latency = StageLatency(
        queue_s=_float32(queue_s),
        decode_s=_float32(decode_s),
        inference_s=_float32(inference_s),
        total_s=_float32(total_s),
        batch_size=int(batch_size),
    )
    return ResultRecord(
        frame_id=str(frame_id),
        line_id=str(line_id),
        camera_id=str(camera_id),
        captured_at_ns=int(captured),
        ingested_at_ns=int(ingested),
        inferred_at_ns=int(inferred),
        model_name=str(model_name),
        model_version=str(model_version),
        image_width=int(width),
        image_height=int(height),
        detections=detections,
        verdict="fail" if verdict == "fail" else "pass",
        latency=latency,
        source_topic=str(topic),
        source_partition=int(partition),
        source_offset=int(offset),
        run_id=str(run_id),
        trace_id=str(trace_id),
    )


@dataclass(frozen=True)
class ResultPage:
    """One page of results and the cursor of the next page (None at the end)."""

    results: list[ResultRecord]
    next_cursor: str | None


@dataclass(frozen=True)
class Backfill:
    """Results inferred after a point in time, the newest ``limit`` of them.

    ``left_out`` counts the older matching results beyond the limit.
    """

    results: list[ResultRecord]
    left_out: int


class ResultQueries:
    """The edge's read queries over one ResultStore."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        database = store.database
        self._results = f"{database}.frame_results FINAL"
        self._minutes = f"{database}.frame_results_minute"

    def results_page(
        self,
        line: str,
        time_range: TimeRange,
        *,
        run_id: str = "",
        verdict: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
        descending: bool = False,
    ) -> ResultPage:
        """Return results of one line captured in ``time_range``, one page.

        Pages are keyed on (capture time, frame id), so rows stored while a
        client pages through never shift the pages it has not read yet.
        """
        if not 1 <= limit <= MAX_PAGE_RESULTS:
            raise ConfigError(f"limit={limit} is invalid: use 1 to {MAX_PAGE_RESULTS}")
        params: dict[str, Any] = {
            **time_range.params(),
            "line": line,
            "run": run_id,
            "limit": limit + 1,
        }
        where = (
            "line_id = {line:String} AND run_id = {run:String} AND "
            + _CAPTURED_IN_RANGE
        )
        if verdict is not None:
            where += _VERDICT_FILTER
            params["verdict"] = verdict
        direction = "DESC" if descending else "ASC"
        if cursor is not None:
            params["after_ns"], params["after_id"] = decode_cursor(cursor)
            compare = "<" if descending else ">"
            where += (
                f" AND (captured_at, frame_id) {compare} "
                "(fromUnixTimestamp64Nano({after_ns:Int64}), {after_id:String})"
            )
        rows = self.store.query(
            f"SELECT {_RECORD_COLUMNS} FROM {self._results} WHERE {where} "
            f"ORDER BY captured_at {direction}, frame_id {direction} "
            "LIMIT {limit:UInt32}",
            params,
        )
        records = [record_from_row(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = records[-1]
            next_cursor = encode_cursor(last.captured_at_ns, last.frame_id)
        return ResultPage(records, next_cursor)

    def results_since(
        self,
        lines: Sequence[str] | None,
        since_ns: int,
        *,
        run_id: str = "",
        verdict: str | None = None,
        limit: int = 1000,
    ) -> Backfill:
        """Return results inferred at or after ``since_ns``, oldest first.

        ``lines`` None means every line. Selects by inference time, which is
        about when a worker produced the result, so a client that reconnects
        gets what was produced while it was away.
        """
        params: dict[str, Any] = {"since_ns": since_ns, "run": run_id, "limit": limit}
        where = (
            "run_id = {run:String} "
            "AND inferred_at >= fromUnixTimestamp64Nano({since_ns:Int64})"
        )
        if lines is not None:
            where += _LINES_FILTER
            params["lines"] = list(lines)
        if verdict is not None:
            where += _VERDICT_FILTER
            params["verdict"] = verdict
        total = int(
            self.store.query(
                f"SELECT count() FROM {self._results} WHERE {where}", params
            )[0][0]
        )
        rows = self.store.query(
            f"SELECT {_RECORD_COLUMNS} FROM {self._results} WHERE {where} "
            "ORDER BY inferred_at DESC, frame_id DESC LIMIT {limit:UInt32}",
            params,
        )
        records = [record_from_row(row) for row in reversed(rows)]
        return Backfill(records, max(0, total - len(records)))

    def result_for_frame(self, frame_id: str, run_id: str = "") -> ResultRecord | None:
        """Return the stored result of one frame in one run, or None."""
        rows = self.store.query(
            f"SELECT {_RECORD_COLUMNS} FROM {self._results} "
            "WHERE frame_id = {frame:String} AND run_id = {run:String} LIMIT 1",
            {"frame": frame_id, "run": run_id},
        )
        return record_from_row(rows[0]) if rows else None

    def defect_rate_per_minute(
        self, lines: Sequence[str] | None, time_range: TimeRange, *, run_id: str = ""
    ) -> dict[str, list[dict[str, Any]]]:
        """Return frames, failed frames and defect rate per line and minute.

        Reads the per-minute rollup. A bucket is included when its minute
        starts in the range, after the range start was rounded down to a
        whole minute.
        """
        params: dict[str, Any] = {
            "start_s": time_range.start_ns // NS_PER_S // 60 * 60,
            "end_s": -(-time_range.end_ns // NS_PER_S),
            "run": run_id,
        }
        where = (
            "run_id = {run:String} AND minute >= toDateTime({start_s:Int64}, 'UTC') "
            "AND minute < toDateTime({end_s:Int64}, 'UTC')"
        )
        if lines is not None:
            where += _LINES_FILTER
            params["lines"] = list(lines)
        rows = self.store.query(
            "SELECT line_id, toUnixTimestamp(minute), uniqExactMerge(frames), "
            f"uniqExactIfMerge(failed_frames) FROM {self._minutes} WHERE {where} "
            "GROUP BY line_id, minute ORDER BY line_id, minute",
            params,
        )
        per_line: dict[str, list[dict[str, Any]]] = {}
        for line, minute_s, frames, failed in rows:
            per_line.setdefault(str(line), []).append(
                {
                    "minute_s": int(minute_s),
                    "frames": int(frames),
                    "failed_frames": int(failed),
                    "defect_rate": int(failed) / int(frames) if frames else 0.0,
                }
            )
        return per_line

    def top_defect_classes(
        self,
        lines: Sequence[str] | None,
        time_range: TimeRange,
        *,
        run_id: str = "",
        limit: int = 10,
    ) -> list[dict[str, Any]]:
        """Return the classes with the most detections, with frames per class."""
        if not 1 <= limit <= MAX_TOP_CLASSES:
            raise ConfigError(f"limit={limit} is invalid: use 1 to {MAX_TOP_CLASSES}")
        params: dict[str, Any] = {**time_range.params(), "run": run_id, "limit": limit}
        where = "run_id = {run:String} AND " + _CAPTURED_IN_RANGE
        if lines is not None:
            where += _LINES_FILTER
            params["lines"] = list(lines)
        rows = self.store.query(
            "SELECT name, count() AS detections, uniqExact(frame_id) "
            f"FROM {self._results} ARRAY JOIN class_names AS name WHERE {where} "
            "GROUP BY name ORDER BY detections DESC, name LIMIT {limit:UInt32}",
            params,
        )
        return [
            {
                "class_name": str(name),
                "detections": int(detections),
                "frames": int(frames),
            }
            for name, detections, frames in rows
        ]

    def latency_percentiles(
        self, lines: Sequence[str] | None, time_range: TimeRange, *, run_id: str = ""
    ) -> dict[str, Any]:
        """Return p50, p90, p95 and p99 of each stage's seconds.

        ClickHouse's ``quantiles`` samples up to 8192 values per stage, so
        above that many frames the percentiles are estimates.
        """
        params: dict[str, Any] = {**time_range.params(), "run": run_id}
        where = "run_id = {run:String} AND " + _CAPTURED_IN_RANGE
        if lines is not None:
            where += _LINES_FILTER
            params["lines"] = list(lines)
        levels = ", ".join(str(level) for level in LATENCY_LEVELS)
        columns = ", ".join(f"quantiles({levels})({stage})" for stage in LATENCY_STAGES)
        row = self.store.query(
            f"SELECT count(), {columns} FROM {self._results} WHERE {where}", params
        )[0]
        frames = int(row[0])
        stages: dict[str, dict[str, float]] = {}
        if frames:
            for stage, values in zip(LATENCY_STAGES, row[1:], strict=True):
                stages[stage.removesuffix("_s")] = {
                    f"p{round(level * 100)}": float(value)
                    for level, value in zip(LATENCY_LEVELS, values, strict=True)
                }
        return {"frames": frames, "stages_s": stages}

    def model_versions(
        self,
        lines: Sequence[str] | None,
        time_range: TimeRange,
        *,
        run_id: str | None = "",
    ) -> list[dict[str, Any]]:
        """Return each model name and version that produced results, per line and run.

        ``run_id`` None lists every run; the default lists live results only.
        """
        params: dict[str, Any] = dict(time_range.params())
        where = _CAPTURED_IN_RANGE
        if run_id is not None:
            where += " AND run_id = {run:String}"
            params["run"] = run_id
        if lines is not None:
            where += _LINES_FILTER
            params["lines"] = list(lines)
        rows = self.store.query(
            "SELECT line_id, model_name, model_version, run_id, count(), "
            "toUnixTimestamp64Nano(min(captured_at)), "
            "toUnixTimestamp64Nano(max(captured_at)) "
            f"FROM {self._results} WHERE {where} "
            "GROUP BY line_id, model_name, model_version, run_id "
            "ORDER BY line_id, model_name, model_version, run_id",
            params,
        )
        return [
            {
                "line_id": str(line),
                "model_name": str(name),
                "model_version": str(version),
                "run_id": str(run),
                "frames": int(frames),
                "first_captured_at_ns": int(first),
                "last_captured_at_ns": int(last),
            }
            for line, name, version, run, frames, first, last in rows
        ]

    def known_lines(self, since_ns: int) -> list[str]:
        """Return the lines with results captured since ``since_ns``, sorted."""
        rows = self.store.query(
            f"SELECT DISTINCT line_id FROM {self._minutes} "
            "WHERE minute >= toDateTime({since_s:Int64}, 'UTC') ORDER BY line_id",
            {"since_s": since_ns // NS_PER_S // 60 * 60},
        )
        return [str(row[0]) for row in rows]
