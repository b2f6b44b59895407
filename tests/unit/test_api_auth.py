"""View tokens on the results edge: HTTP 401/403 and WebSocket close codes.

The app runs in process on uvicorn without the sink and the live consumer.
Live messages go to its hub directly, as the consumer thread would send them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipeline.api import create_api
from pipeline.live import LiveOptions, live_message
from schemas import ResultRecord, StageLatency
from tests.unit.api_server import serve

TOKENS = {
    "tokens": [
        {"token": "view-la", "roles": ["view"], "lines": ["la"]},
        {"token": "view-all", "roles": ["view"], "lines": ["*"]},
        {"token": "ingest-all", "roles": ["ingest"], "lines": ["*"]},
    ]
}
VIEW_LA = {"Authorization": "Bearer view-la"}


def fresh_record(line: str, index: int) -> ResultRecord:
    now = time.time_ns()
    return ResultRecord(
        frame_id=f"{line}-{index}", line_id=line, camera_id="cam-1",
        captured_at_ns=now, ingested_at_ns=now, inferred_at_ns=now,
        model_name="m", model_version="1", image_width=8, image_height=8,
        detections=(), verdict="pass", latency=StageLatency(0, 0, 0, 0, 1),
        source_topic=f"frames.{line}", source_partition=0, source_offset=index,
    )  # fmt: skip


@dataclass
class Edge:
    app: FastAPI
    url: str

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/results"

    def publish(self, records: list[ResultRecord]) -> None:
        messages = [live_message(r, r.to_json().decode()) for r in records]
        assert self.app.state.hub.publish_from_thread(messages, threading.Event())


@pytest.fixture
def edge(store_settings) -> Iterator[Edge]:  # type: ignore[no-untyped-def]
    settings = store_settings.model_copy(
        update={"tokens": SecretStr(json.dumps(TOKENS))}
    )
    app = create_api(
        settings,
        with_sink=False,
        with_live=False,
        live_options=LiveOptions(max_clients=3),
    )
    with serve(app) as url:
        app.state.store.insert_results(
            [fresh_record("la", 1), fresh_record("lb", 2)], "rows"
        )
        yield Edge(app, url)


def get(
    edge: Edge, path: str, headers: dict[str, str] | None = None, **params: str
) -> httpx.Response:
    return httpx.get(edge.url + path, headers=headers, params=params, timeout=30)


DATA_ROUTES = [
    "/v1/lines",
    "/v1/lines/la/results",
    "/v1/defect-rate",
    "/v1/defect-classes",
    "/v1/latency",
    "/v1/models",
    "/v1/summary",
    "/v1/results",
    "/v1/frames/frames.la/0/0",
]


@pytest.mark.parametrize("path", DATA_ROUTES)
def test_data_routes_without_token_401(edge: Edge, path: str) -> None:
    response = get(edge, path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Authorization" in response.json()["detail"]


@pytest.mark.parametrize("path", DATA_ROUTES)
def test_data_routes_invalid_token_401(edge: Edge, path: str) -> None:
    response = get(edge, path, headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json()["detail"] == "bearer token is invalid"


@pytest.mark.parametrize(
    "path",
    ["/v1/lines/lb/results", "/v1/frames/frames.lb/0/0", "/v1/summary"],
)
def test_other_line_403(edge: Edge, path: str) -> None:
    response = get(edge, path, headers=VIEW_LA)
    assert response.status_code == 403
    assert "no view right" in response.json()["detail"]


def test_requested_other_line_403(edge: Edge) -> None:
    response = get(edge, "/v1/defect-rate", headers=VIEW_LA, lines="la,lb")
    assert response.status_code == 403
    assert "'lb'" in response.json()["detail"]


def test_ingest_token_403(edge: Edge) -> None:
    response = get(
        edge, "/v1/lines/la/results", headers={"Authorization": "Bearer ingest-all"}
    )
    assert response.status_code == 403


def test_line_token_sees_own_lines(edge: Edge) -> None:
    assert get(edge, "/v1/lines", headers=VIEW_LA).json()["lines"] == ["la"]
    rates = get(edge, "/v1/defect-rate", headers=VIEW_LA).json()["lines"]
    assert list(rates) == ["la"]
    models = get(edge, "/v1/models", headers=VIEW_LA).json()["models"]
    assert [m["line_id"] for m in models] == ["la"]
    assert get(edge, "/v1/summary", headers=VIEW_LA, line="la").json()["frames"] == 1
    found = get(edge, "/v1/results", headers=VIEW_LA, frame_id="lb-2").json()["results"]
    assert found == []


def test_wildcard_token_sees_every_line(edge: Edge) -> None:
    headers = {"Authorization": "Bearer view-all"}
    assert get(edge, "/v1/lines", headers=headers).json()["lines"] == ["la", "lb"]
    assert get(edge, "/v1/summary", headers=headers).json()["frames"] == 2


def test_token_query_parameter(edge: Edge) -> None:
    response = get(edge, "/v1/lines/la/results", token="view-la")
    assert response.status_code == 200
    assert [r["frame_id"] for r in response.json()["results"]] == ["la-1"]


@pytest.mark.parametrize(
    "path",
    ["/healthz", "/readyz", "/metrics", "/", "/static/app.js", "/static/style.css"],
)
def test_open_routes_need_no_token(edge: Edge, path: str) -> None:
    assert get(edge, path).status_code == 200


async def close_code(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    async with connect(
        url, additional_headers=headers, proxy=None, open_timeout=10
    ) as socket:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), 10)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


@pytest.mark.parametrize(
    ("query", "code", "reason"),
    [
        ("?lines=la", 4401, "missing Authorization"),
        ("?lines=la&token=nope", 4401, "invalid"),
        ("?lines=lb&token=view-la", 4403, "no view right"),
        ("?token=ingest-all", 4403, "no view right"),
        ("?lines=la&token=view-la&verdict=maybe", 4400, "verdict"),
        ("?lines=Bad!&token=view-la", 4400, "line id"),
        ("?lines=la&token=view-la&since=yesterday", 4400, "since"),
    ],
)
def test_websocket_close_codes(edge: Edge, query: str, code: int, reason: str) -> None:
    received_code, received_reason = asyncio.run(close_code(edge.ws_url + query))
    assert received_code == code
    assert reason in received_reason


def test_websocket_header_token(edge: Edge) -> None:
    async def scenario() -> dict:
        async with connect(
            edge.ws_url + "?lines=la", additional_headers=VIEW_LA, proxy=None
        ) as socket:
            return json.loads(await asyncio.wait_for(socket.recv(), 10))

    assert asyncio.run(scenario())["type"] == "hello"


def test_websocket_line_token_gets_own_lines(edge: Edge) -> None:
    async def scenario() -> list[str]:
        async with connect(edge.ws_url + "?token=view-la", proxy=None) as socket:
            hello = json.loads(await asyncio.wait_for(socket.recv(), 10))
            assert hello["lines"] is None
            await asyncio.to_thread(
                edge.publish,
                [
                    fresh_record("lb", 10),
                    fresh_record("la", 11),
                    fresh_record("la", 12),
                ],
            )
            frames = []
            while len(frames) < 2:
                message = json.loads(await asyncio.wait_for(socket.recv(), 10))
                if message["type"] == "result":
                    frames.append(message["result"]["frame_id"])
            return frames

    assert asyncio.run(scenario()) == ["la-11", "la-12"]


def test_websocket_over_max_clients_1013(edge: Edge) -> None:
    async def scenario() -> tuple[int, str]:
        url = edge.ws_url + "?token=view-all"
        async with (
            connect(url, proxy=None) as first,
            connect(url, proxy=None) as second,
        ):
            async with connect(url, proxy=None) as third:
                for socket in (first, second, third):
                    await asyncio.wait_for(socket.recv(), 10)
                return await close_code(url)

    code, reason = asyncio.run(scenario())
    assert code == 1013
    assert "3 clients" in reason
