"""Every rejection of the ingest edge, against the real broker.

Each case checks the status, the error code and that the JSON body names the
value and, where there is one, the limit. The broker-outage case (503 and
readiness) has its own module because it stops a broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from ingest.edge import running_edge
from pipeline.kafka import ensure_line_topics
from pipeline.settings import Settings
from tests.integration.test_ingest_frames import read_topic

pytestmark = pytest.mark.integration

JPEG_BODY = b"\xff\xd8\xff\xe0" + os.urandom(2000) + b"\xff\xd9"
TOKENS = {
    "tokens": [
        {
            "token": "secret-ingest-all",
            "roles": ["ingest"],
            "lines": ["*"],
            "name": "fleet",
        },
        {
            "token": "secret-ingest-other",
            "roles": ["ingest"],
            "lines": ["other-line"],
            "name": "other",
        },
        {"token": "secret-viewer", "roles": ["view"], "lines": ["*"], "name": "viewer"},
    ]
}

EdgeFactory = Callable[..., tuple[str, Settings]]


@pytest.fixture
def start_edge(
    kafka_bootstrap: str, line_id: str, tmp_path: Path
) -> Iterator[EdgeFactory]:
    """Return a function that starts an edge for ``line_id`` with setting overrides."""
    with ExitStack() as stack:

        def start(
            topic_overrides: dict[str, Any] | None = None, **overrides: Any
        ) -> tuple[str, Settings]:
            settings = Settings(
                bootstrap_servers=kafka_bootstrap, home=tmp_path, **overrides
            )
            topic_settings = settings.model_copy(update=topic_overrides or {})
            ensure_line_topics(topic_settings, line_id)
            return stack.enter_context(running_edge(settings)), settings

        yield start


def post_frame(
    url: str, line: str, body: bytes = JPEG_BODY, **headers: str
) -> httpx.Response:
    sent = {"Content-Type": "image/jpeg", "Camera-Id": "cam-1"}
    sent.update({name.replace("_", "-"): value for name, value in headers.items()})
    sent = {name: value for name, value in sent.items() if value != ""}
    return httpx.post(
        f"{url}/v1/lines/{line}/frames", content=body, headers=sent, timeout=30
    )


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert body["status"] == status
    assert body["message"]
    assert "value" in body
    assert "limit" in body
    return body


# 401 and 403


def test_auth_missing_or_invalid_token_401(
    start_edge: EdgeFactory, line_id: str
) -> None:
    url, _ = start_edge(tokens=SecretStr(json.dumps(TOKENS)))
    for authorization in ("", "Bearer wrong-token", "Basic c2VjcmV0", "Bearer"):
        response = post_frame(url, line_id, Authorization=authorization)
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer"


def test_auth_token_without_right_403(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge(tokens=SecretStr(json.dumps(TOKENS)))
    for token in ("secret-ingest-other", "secret-viewer"):
        body = assert_error(
            post_frame(url, line_id, Authorization=f"Bearer {token}"), 403, "forbidden"
        )
        assert line_id in body["message"]
    response = post_frame(url, line_id, Authorization="Bearer secret-ingest-all")
    assert response.status_code == 202, response.text


def test_auth_covers_every_route(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge(tokens=SecretStr(json.dumps(TOKENS)))
    upload = f"{url}/v1/lines/{line_id}/uploads/{'0' * 32}"
    for method, target in (
        ("POST", f"{url}/v1/lines/{line_id}/frames:batch"),
        ("POST", f"{url}/v1/lines/{line_id}/uploads"),
        ("GET", upload),
        ("PUT", f"{upload}/chunks/0"),
        ("POST", f"{upload}:complete"),
        ("DELETE", upload),
    ):
        assert_error(httpx.request(method, target, content=b"{}"), 401, "unauthorized")


def test_auth_websocket_handshake(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge(tokens=SecretStr(json.dumps(TOKENS)))
    base = url.replace("http", "ws", 1)

    async def handshake(line: str, token: str | None) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with connect(
                f"{base}/v1/lines/{line}/stream", additional_headers=headers
            ) as websocket:
                return 101, json.loads(await websocket.recv())
        except InvalidStatus as exc:
            return exc.response.status_code, json.loads(exc.response.body or b"{}")

    for line, token, status, code in (
        (line_id, None, 401, "unauthorized"),
        (line_id, "wrong", 401, "unauthorized"),
        (line_id, "secret-ingest-other", 403, "forbidden"),
        ("no-such-line", "secret-ingest-all", 404, "unknown-line"),
    ):
        got_status, body = asyncio.run(handshake(line, token))
        assert got_status == status
        assert body["error"] == code
    status, greeting = asyncio.run(handshake(line_id, "secret-ingest-all"))
    assert status == 101
    assert greeting["type"] == "credit"


def test_tokens_never_logged(
    start_edge: EdgeFactory, line_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url, _ = start_edge(tokens=SecretStr(json.dumps(TOKENS)))
    for token in ("secret-ingest-all", "secret-ingest-other", "secret-wrong"):
        post_frame(url, line_id, Authorization=f"Bearer {token}")
    assert caplog.records
    assert "secret-" not in caplog.text


# 404


def test_unknown_line_404(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge()
    missing = f"{line_id}-missing"
    body = assert_error(post_frame(url, missing), 404, "unknown-line")
    assert body["value"] == missing
    assert f"frames.{missing}" in body["message"]
    body = assert_error(post_frame(url, "Line%203"), 404, "unknown-line")
    assert "invalid" in body["message"]
    assert_error(httpx.get(f"{url}/v1/nothing"), 404, "not-found")


def test_line_created_after_start_found(
    start_edge: EdgeFactory, line_id: str, kafka_bootstrap: str
) -> None:
    url, settings = start_edge()
    later = f"{line_id}-later"
    assert post_frame(url, later).status_code == 404
    ensure_line_topics(settings, later)
    response = post_frame(url, later)
    assert response.status_code == 202, response.text


# 413


def test_frame_over_limit_413(start_edge: EdgeFactory, line_id: str) -> None:
    url, settings = start_edge(max_message_bytes=64 * 1024)
    body = b"\xff\xd8\xff" + bytes(100_000) + b"\xff\xd9"
    error = assert_error(post_frame(url, line_id, body), 413, "frame-too-large")
    assert error["value"] == len(body)
    assert error["limit"] == 64 * 1024
    assert "FAULTLINE_MAX_MESSAGE_BYTES" in error["message"]

    def chunked() -> Iterator[bytes]:
        for _ in range(10):
            yield bytes(10_000)

    response = httpx.post(
        f"{url}/v1/lines/{line_id}/frames",
        content=chunked(),
        headers={"Content-Type": "image/jpeg", "Camera-Id": "cam-1"},
    )
    error = assert_error(response, 413, "frame-too-large")
    assert error["value"] > 64 * 1024
    assert error["limit"] == 64 * 1024
    # At the limit exactly, the frame goes through.
    exact = b"\xff\xd8\xff" + bytes(64 * 1024 - 5) + b"\xff\xd9"
    assert post_frame(url, line_id, exact).status_code == 202


def test_topic_smaller_than_edge_limit_413(
    start_edge: EdgeFactory, line_id: str
) -> None:
    url, _ = start_edge(
        max_message_bytes=1024 * 1024, topic_overrides={"max_message_bytes": 64 * 1024}
    )
    body = b"\xff\xd8\xff" + os.urandom(300_000) + b"\xff\xd9"
    error = assert_error(post_frame(url, line_id, body), 413, "frame-too-large")
    assert error["value"] == len(body)
    assert f"frames.{line_id}" in error["message"]


# 415


@pytest.mark.parametrize(
    ("content_type", "body", "code"),
    [
        ("text/plain", JPEG_BODY, "unsupported-media-type"),
        ("", JPEG_BODY, "unsupported-media-type"),
        ("image/gif", b"GIF89a" + bytes(100), "unsupported-media-type"),
        ("image/png", JPEG_BODY, "not-an-image"),
        ("image/jpeg", JPEG_BODY[:-2] + b"\x00\x01\x02", "not-an-image"),
        ("image/jpeg", b"", "not-an-image"),
        ("image/png", b"\x89PNG\r\n\x1a\n" + bytes(100), "not-an-image"),
        (
            "image/bmp",
            b"BM" + (10**6).to_bytes(4, "little") + bytes(100),
            "not-an-image",
        ),
    ],
)
def test_not_an_image_415(
    start_edge: EdgeFactory, line_id: str, content_type: str, body: bytes, code: str
) -> None:
    url, _ = start_edge()
    error = assert_error(
        post_frame(url, line_id, body, Content_Type=content_type), 415, code
    )
    assert error["limit"] == ["image/jpeg", "image/png", "image/bmp"]


def test_batch_not_multipart_415(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge()
    response = httpx.post(
        f"{url}/v1/lines/{line_id}/frames:batch",
        content=JPEG_BODY,
        headers={"Content-Type": "image/jpeg"},
    )
    assert_error(response, 415, "unsupported-media-type")


# 422


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"Camera_Id": ""}, "Camera-Id"),
        ({"Camera_Id": "../etc"}, "Camera-Id"),
        ({"Camera_Id": "/etc/passwd"}, "Camera-Id"),
        ({"Camera_Id": "x" * 65}, "Camera-Id"),
        ({"Frame_Id": "../../frames"}, "Frame-Id"),
        ({"Frame_Id": "/abs/frame"}, "Frame-Id"),
        ({"Captured_At": "1738310400"}, "Captured-At"),
        ({"Captured_At": "last tuesday"}, "Captured-At"),
        ({"Captured_At": "2025-01-31T08:00:00"}, "Captured-At"),
    ],
)
def test_bad_headers_422(
    start_edge: EdgeFactory, line_id: str, headers: dict[str, str], named: str
) -> None:
    url, _ = start_edge()
    error = assert_error(post_frame(url, line_id, **headers), 422, "invalid-header")
    assert named in error["message"]


def test_header_query_conflict_422(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge()
    response = httpx.post(
        f"{url}/v1/lines/{line_id}/frames",
        params={"camera_id": "cam-2"},
        content=JPEG_BODY,
        headers={"Content-Type": "image/jpeg", "Camera-Id": "cam-1"},
    )
    error = assert_error(response, 422, "invalid-header")
    assert error["value"] == ["cam-1", "cam-2"]


def test_future_capture_time_rejected_by_broker_422(
    start_edge: EdgeFactory, line_id: str
) -> None:
    url, _ = start_edge()
    # Kafka 4.1.1, the broker of deploy/kafka/pom.xml, rejects timestamps more
    # than an hour ahead: log.message.timestamp.after.max.ms defaults to 3600000.
    in_two_hours_ns = time.time_ns() + 2 * 3600 * 10**9
    error = assert_error(
        post_frame(url, line_id, Captured_At=str(in_two_hours_ns)),
        422,
        "invalid-header",
    )
    assert "capture time" in error["message"]


# 429


def test_producer_queue_full_429(start_edge: EdgeFactory, line_id: str) -> None:
    url, settings = start_edge(ingest_queue_max_frames=1)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            requests = [
                client.post(
                    f"/v1/lines/{line_id}/frames",
                    content=JPEG_BODY,
                    headers={"Content-Type": "image/jpeg", "Camera-Id": f"cam-{i % 4}"},
                )
                for i in range(40)
            ]
            return await asyncio.gather(*requests)

    responses = asyncio.run(burst())
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {202, 429}
    assert 429 in statuses
    full = next(response for response in responses if response.status_code == 429)
    error = assert_error(full, 429, "queue-full")
    assert error["limit"] == 1
    assert full.headers["Retry-After"] == str(settings.ingest_retry_after_s)
    accepted = statuses.count(202)
    assert accepted >= 1
    assert len(read_topic(settings, f"frames.{line_id}", accepted)) == accepted


# Probes and docs


def test_probes_and_docs(start_edge: EdgeFactory) -> None:
    url, _ = start_edge()
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok", "broker": "reachable"}
    ready = httpx.get(f"{url}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "broker": "reachable"}
    assert httpx.get(f"{url}/docs").status_code == 200
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert "/v1/lines/{line}/frames" in paths
    assert "/v1/lines/{line}/frames:batch" in paths
    assert "/v1/lines/{line}/uploads/{upload_id}:complete" in paths
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.status_code == 200
    assert "faultline_ingest_broker_reachable 1.0" in metrics.text
