"""Every REST query of the results edge against chDB with known rows.

The app runs in process, served by uvicorn on a thread, without the sink and
the live consumer, so no broker is needed. Rows go straight into the store,
in a fresh database per test.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI

from pipeline.api import create_api
from pipeline.errors import ConfigError
from pipeline.queries import decode_cursor, encode_cursor, parse_time_ns
from schemas import Detection, ResultRecord, StageLatency
from tests.unit.api_server import serve

T0_NS = int(datetime(2025, 3, 1, 10, 0, tzinfo=UTC).timestamp()) * 1_000_000_000
SECOND_NS = 1_000_000_000
MINUTE_NS = 60 * SECOND_NS
RANGE = {"start": "2025-03-01T09:00:00Z", "end": "2025-03-01T11:00:00Z"}


def row(
    line: str,
    index: int,
    minute: int,
    classes: tuple[str, ...] = (),
    *,
    version: str = "1",
    run_id: str = "",
    total_s: float = 0.1,
) -> ResultRecord:
    detections = tuple(
        Detection(
            ["open", "short", "spur"].index(name), name, 0.75, 10.0, 20.0, 50.0, 60.0
        )
        for name in classes
    )
    captured = T0_NS + minute * MINUTE_NS + index * SECOND_NS
    return ResultRecord(
        frame_id=f"{line}-{minute}-{index}",
        line_id=line,
        camera_id=f"cam-{index % 2}",
        captured_at_ns=captured,
        ingested_at_ns=captured + 1000,
        inferred_at_ns=captured + 2000,
        model_name="pcb",
        model_version=version,
        image_width=640,
        image_height=480,
        detections=detections,
        verdict="fail" if detections else "pass",
        latency=StageLatency(total_s / 4, 0.002, total_s / 2, total_s, 4),
        source_topic=f"frames.{line}",
        source_partition=index % 3,
        source_offset=minute * 100 + index,
        run_id=run_id,
    )


def known_rows() -> list[ResultRecord]:
    """Line la: 10 live frames, 5 failing; lb: 5 passing frames; one replay row."""
    la_minute_0 = [
        row("la", 0, 0, ("open", "open"), total_s=0.1),
        row("la", 1, 0, ("short",), total_s=0.2),
        row("la", 2, 0, total_s=0.3),
        row("la", 3, 0, total_s=0.4),
        row("la", 4, 0, total_s=0.5),
        row("la", 5, 0, total_s=0.6),
    ]
    la_minute_1 = [
        row("la", 0, 1, ("open",), version="2", total_s=0.7),
        row("la", 1, 1, ("spur", "short"), version="2", total_s=0.8),
        row("la", 2, 1, ("open",), version="2", total_s=0.9),
        row("la", 3, 1, version="2", total_s=1.0),
    ]
    lb = [row("lb", index, 0, total_s=0.05) for index in range(5)]
    replay = [row("la", 0, 0, ("spur",), version="9", run_id="replay-1")]
    return la_minute_0 + la_minute_1 + lb + replay


class Client(httpx.Client):
    app: FastAPI


@pytest.fixture
def client(store_settings) -> Iterator[Client]:  # type: ignore[no-untyped-def]
    app = create_api(store_settings, with_sink=False, with_live=False)
    with serve(app) as url, Client(base_url=url, timeout=30) as http:
        http.app = app
        store = app.state.store
        rows = known_rows()
        store.insert_results(rows, "batch-1")
        # The same frame again from a redelivered batch: counts must not change.
        store.insert_results(rows[:2], "batch-2")
        yield http


def get(client: Client, path: str, **params: object) -> dict:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_line_results_pages_in_capture_order(client: Client) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {**RANGE, "limit": 4} | ({"cursor": cursor} if cursor else {})
        body = get(client, "/v1/lines/la/results", **params)
        seen += [result["frame_id"] for result in body["results"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == [f"la-0-{i}" for i in range(6)] + [f"la-1-{i}" for i in range(4)]


def test_line_results_descending(client: Client) -> None:
    body = get(client, "/v1/lines/la/results", **RANGE, limit=3, order="desc")
    assert [r["frame_id"] for r in body["results"]] == ["la-1-3", "la-1-2", "la-1-1"]
    second = get(
        client,
        "/v1/lines/la/results",
        **RANGE,
        limit=3,
        order="desc",
        cursor=body["next_cursor"],
    )
    assert [r["frame_id"] for r in second["results"]] == ["la-1-0", "la-0-5", "la-0-4"]


def test_line_results_full_record(client: Client) -> None:
    body = get(client, "/v1/lines/la/results", **RANGE, limit=1)
    assert body["results"][0] == {
        **row("la", 0, 0, ("open", "open"), total_s=0.1).__dict__,
        "detections": [
            {"class_id": 0, "class_name": "open", "confidence": 0.75,
             "x1": 10.0, "y1": 20.0, "x2": 50.0, "y2": 60.0},
        ] * 2,
        "latency": {"queue_s": 0.025, "decode_s": 0.002, "inference_s": 0.05,
                    "total_s": 0.1, "batch_size": 4},
    }  # fmt: skip


def test_line_results_verdict_and_range(client: Client) -> None:
    failing = get(client, "/v1/lines/la/results", **RANGE, verdict="fail")
    assert [r["frame_id"] for r in failing["results"]] == [
        "la-0-0",
        "la-0-1",
        "la-1-0",
        "la-1-1",
        "la-1-2",
    ]
    minute_start_ms = (T0_NS + MINUTE_NS) // 1_000_000
    minute_1 = get(
        client,
        "/v1/lines/la/results",
        start=str(minute_start_ms),
        end=str(minute_start_ms + 60_000),
    )
    assert [r["frame_id"] for r in minute_1["results"]] == [
        f"la-1-{i}" for i in range(4)
    ]
    replay = get(client, "/v1/lines/la/results", **RANGE, run_id="replay-1")
    assert [r["model_version"] for r in replay["results"]] == ["9"]


def test_defect_rate_per_minute(client: Client) -> None:
    body = get(client, "/v1/defect-rate", **RANGE)
    minute_0 = T0_NS // SECOND_NS
    assert body["lines"] == {
        "la": [
            {
                "minute_s": minute_0,
                "frames": 6,
                "failed_frames": 2,
                "defect_rate": 2 / 6,
            },
            {
                "minute_s": minute_0 + 60,
                "frames": 4,
                "failed_frames": 3,
                "defect_rate": 0.75,
            },
        ],
        "lb": [
            {"minute_s": minute_0, "frames": 5, "failed_frames": 0, "defect_rate": 0.0}
        ],
    }
    only_lb = get(client, "/v1/defect-rate", lines="lb", **RANGE)
    assert list(only_lb["lines"]) == ["lb"]


def test_top_defect_classes(client: Client) -> None:
    body = get(client, "/v1/defect-classes", **RANGE)
    assert body["classes"] == [
        {"class_name": "open", "detections": 4, "frames": 3},
        {"class_name": "short", "detections": 2, "frames": 2},
        {"class_name": "spur", "detections": 1, "frames": 1},
    ]
    top_one = get(client, "/v1/defect-classes", **RANGE, limit=1)
    assert [c["class_name"] for c in top_one["classes"]] == ["open"]
    replay = get(client, "/v1/defect-classes", **RANGE, run_id="replay-1")
    assert replay["classes"] == [{"class_name": "spur", "detections": 1, "frames": 1}]


def test_latency_percentiles(client: Client) -> None:
    body = get(client, "/v1/latency", lines="la", **RANGE)
    assert body["frames"] == 10
    total = body["stages_s"]["total"]
    # Ten values 0.1 .. 1.0: ClickHouse interpolates between neighbours.
    assert total["p50"] == pytest.approx(0.55, abs=0.06)
    assert total["p90"] == pytest.approx(0.91, abs=0.06)
    assert total["p50"] <= total["p90"] <= total["p95"] <= total["p99"] <= 1.0
    assert body["stages_s"]["decode"]["p99"] == pytest.approx(0.002)
    assert set(body["stages_s"]) == {"queue", "decode", "inference", "total"}
    empty = get(
        client,
        "/v1/latency",
        lines="la",
        start="2020-01-01T00:00:00Z",
        end="2020-01-02T00:00:00Z",
    )
    assert empty["frames"] == 0
    assert empty["stages_s"] == {}


def test_model_versions(client: Client) -> None:
    body = get(client, "/v1/models", **RANGE)
    assert [
        (m["line_id"], m["model_version"], m["run_id"], m["frames"])
        for m in body["models"]
    ] == [
        ("la", "1", "", 6),
        ("la", "2", "", 4),
        ("lb", "1", "", 5),
    ]
    first = body["models"][0]
    assert first["first_captured_at_ns"] == T0_NS
    assert first["last_captured_at_ns"] == T0_NS + 5 * SECOND_NS
    every_run = get(client, "/v1/models", lines="la", all_runs="true", **RANGE)
    assert [(m["model_version"], m["run_id"]) for m in every_run["models"]] == [
        ("1", ""), ("2", ""), ("9", "replay-1"),
    ]  # fmt: skip


def test_lines_lists_lines_with_results(client: Client) -> None:
    # The known rows are older than the 24 h window; a fresh row is not.
    store = client.app.state.store
    fresh = row("lc", 0, 0)
    fresh = ResultRecord(
        **{
            **fresh.__dict__,
            "captured_at_ns": parse_time_ns("2100-01-01T00:00:00Z", "t"),
        }
    )
    store.insert_results([fresh], "batch-3")
    assert get(client, "/v1/lines")["lines"] == ["lc"]


def test_queries_bind_parameters(client: Client) -> None:
    injected = "' OR 1=1 --"
    assert (
        get(client, "/v1/lines/la/results", **RANGE, run_id=injected)["results"] == []
    )
    assert get(client, "/v1/defect-classes", **RANGE, run_id=injected)["classes"] == []
    response = client.get("/v1/defect-rate", params={"lines": "la' OR '1'='1", **RANGE})
    assert response.status_code == 422
    assert "line id" in response.json()["detail"]


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        (
            "/v1/lines/la/results",
            {"start": "2025-03-02T00:00:00Z", "end": "2025-03-01T00:00:00Z"},
            "before end",
        ),
        ("/v1/lines/la/results", {"cursor": "not-a-cursor"}, "cursor"),
        ("/v1/latency", {"start": "yesterday"}, "ISO 8601"),
        ("/v1/defect-classes", {"limit": 0}, "limit"),
        ("/v1/lines/la/results", {"verdict": "maybe"}, "verdict"),
        ("/v1/lines/LA/results", {}, "line id"),
    ],
)
def test_invalid_parameters_422(
    client: Client, path: str, params: dict, message: str
) -> None:
    response = client.get(path, params=params)
    assert response.status_code == 422
    assert message in response.text


def test_summary_and_frame_lookup_unchanged(client: Client) -> None:
    summary = get(client, "/v1/summary", line="la")
    assert summary["frames"] == 10
    assert summary["failed_frames"] == 5
    rows = get(client, "/v1/results", frame_id=["la-0-0", "lb-0-1", "missing"])[
        "results"
    ]
    assert sorted(r["frame_id"] for r in rows) == ["la-0-0", "lb-0-1"]


def test_cursor_round_trip() -> None:
    cursor = encode_cursor(T0_NS, "frame-7")
    assert decode_cursor(cursor) == (T0_NS, "frame-7")
    with pytest.raises(ConfigError, match="next_cursor"):
        decode_cursor("W10")


def test_parse_time_forms() -> None:
    assert parse_time_ns("1740823200000", "start") == T0_NS
    assert parse_time_ns("2025-03-01T10:00:00Z", "start") == T0_NS
    assert parse_time_ns("2025-03-01T11:00:00+01:00", "start") == T0_NS
    assert parse_time_ns("2025-03-01T10:00:00", "start") == T0_NS
