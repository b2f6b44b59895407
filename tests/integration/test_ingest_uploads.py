"""Chunked uploads through the ingest edge, against the real broker.

A 20 MB image needs FAULTLINE_MAX_MESSAGE_BYTES above 20 MB on the edge, the
topic and the consumer: an upload becomes one frame message like any other.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from ingest.edge import running_edge
from pipeline.kafka import ensure_line_topics
from pipeline.settings import Settings
from schemas.records import FrameHeaders
from tests.integration.test_ingest_frames import read_topic

pytestmark = pytest.mark.integration

BIG_FRAME_LIMIT = 24 * 1024 * 1024
CHUNK_BYTES = 4 * 1024 * 1024

EdgeFactory = Callable[..., tuple[str, Settings]]


@pytest.fixture
def start_edge(
    kafka_bootstrap: str, line_id: str, tmp_path: Path
) -> Iterator[EdgeFactory]:
    """Return a function that starts an edge for ``line_id`` with setting overrides."""
    with ExitStack() as stack:

        def start(**overrides: Any) -> tuple[str, Settings]:
            overrides.setdefault("ingest_upload_dir", tmp_path / "uploads")
            settings = Settings(
                bootstrap_servers=kafka_bootstrap, home=tmp_path, **overrides
            )
            ensure_line_topics(settings, line_id)
            return stack.enter_context(running_edge(settings)), settings

        yield start


def noise_png(min_bytes: int) -> bytes:
    """A PNG of random pixels, which does not compress, of at least ``min_bytes``."""
    side = int((min_bytes / 3) ** 0.5) + 16
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok
    assert len(encoded) >= min_bytes
    return encoded.tobytes()


def start_upload(client: httpx.Client, line: str, **fields: Any) -> httpx.Response:
    body = {"content_type": "image/png", "camera_id": "cam-big"}
    body.update(fields)
    return client.post(f"/v1/lines/{line}/uploads", json=body)


def test_upload_20mb_out_of_order_with_retry(
    start_edge: EdgeFactory, line_id: str, tmp_path: Path
) -> None:
    url, settings = start_edge(
        max_message_bytes=BIG_FRAME_LIMIT, ingest_upload_chunk_bytes=CHUNK_BYTES
    )
    image = noise_png(20 * 1000 * 1000)
    digest = hashlib.sha256(image).hexdigest()
    client = httpx.Client(base_url=url, timeout=60)

    started = start_upload(
        client, line_id, size=len(image), frame_id="big-1", sha256=digest
    )
    assert started.status_code == 201, started.text
    upload = started.json()
    upload_id = upload["upload_id"]
    base = f"/v1/lines/{line_id}/uploads/{upload_id}"
    assert started.headers["Location"] == base
    assert upload["chunk_bytes"] == CHUNK_BYTES
    count = upload["chunk_count"]
    assert count == -(-len(image) // CHUNK_BYTES)
    assert upload["missing"] == list(range(count))
    chunks = [image[i * CHUNK_BYTES : (i + 1) * CHUNK_BYTES] for i in range(count)]

    # A chunk cut short by a broken link is rejected, and retried below.
    broken = client.put(f"{base}/chunks/2", content=chunks[2][: CHUNK_BYTES // 2])
    assert broken.status_code == 422
    assert broken.json()["error"] == "invalid-chunk"
    assert broken.json()["limit"] == CHUNK_BYTES

    def put(index: int) -> int:
        with httpx.Client(base_url=url, timeout=60) as worker:
            return worker.put(
                f"{base}/chunks/{index}", content=chunks[index]
            ).status_code

    order = [count - 1, 0, 3, 2]  # out of order; chunk 1 still missing
    with ThreadPoolExecutor(max_workers=3) as pool:
        assert list(pool.map(put, order)) == [200] * len(order)
    assert put(0) == 200  # a retry of a stored chunk changes nothing

    status = client.get(base).json()
    assert status["missing"] == [1]
    incomplete = client.post(f"{base}:complete")
    assert incomplete.status_code == 409
    assert incomplete.json()["value"] == [1]

    assert put(1) == 200
    completed = client.post(f"{base}:complete")
    assert completed.status_code == 202, completed.text
    ack = completed.json()
    assert ack["upload_id"] == upload_id
    assert ack["frame_id"] == "big-1"

    messages = read_topic(settings, f"frames.{line_id}", 1)
    assert len(messages) == 1
    message = messages[0]
    assert hashlib.sha256(message.value()).hexdigest() == digest
    assert (message.partition(), message.offset()) == (ack["partition"], ack["offset"])
    headers = FrameHeaders.from_kafka(message.headers())
    assert headers.frame_id == "big-1"
    assert headers.content_type == "image/png"
    assert headers.camera_id == "cam-big"
    # The upload is gone once the broker acknowledged the frame.
    assert list((tmp_path / "uploads").iterdir()) == []
    assert client.get(base).status_code == 404


@pytest.mark.parametrize(
    "upload_path",
    ["%2E%2E", "..%2F..%2Fetc", "%2Fetc%2Fpasswd", "..%5C..%5Cetc", "%2E", "0" * 31,
     "A" * 32,
     "00000000000000000000000000000000%2F..%2F..%2Fcanary"],
)  # fmt: skip
def test_upload_path_ids_rejected(
    start_edge: EdgeFactory, line_id: str, tmp_path: Path, upload_path: str
) -> None:
    url, _ = start_edge()
    canary = tmp_path / "canary"
    canary.write_bytes(b"keep")
    base = f"{url}/v1/lines/{line_id}/uploads/{upload_path}"
    for method, target, body in (
        ("GET", base, b""),
        ("PUT", f"{base}/chunks/0", b"x" * 10),
        ("POST", f"{base}:complete", b""),
        ("DELETE", base, b""),
    ):
        response = httpx.request(method, httpx.URL(target), content=body)
        assert response.status_code in (404, 405, 422), (method, target, response.text)
        assert response.json()["error"] in (
            "invalid-upload-id",
            "not-found",
            "method-not-allowed",
        )
    assert canary.read_bytes() == b"keep"
    assert list((tmp_path / "uploads").iterdir()) == []


def test_upload_dot_dot_id_named_invalid(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge()
    response = httpx.get(httpx.URL(f"{url}/v1/lines/{line_id}/uploads/%2E%2E"))
    assert response.status_code == 422
    assert response.json()["error"] == "invalid-upload-id"
    assert response.json()["value"] == ".."


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("camera_id", "../cam"),
        ("camera_id", "/etc/passwd"),
        ("frame_id", "../../x"),
        ("frame_id", "/abs"),
    ],
)
def test_upload_start_path_fields_422(
    start_edge: EdgeFactory, line_id: str, field: str, value: str
) -> None:
    url, _ = start_edge()
    with httpx.Client(base_url=url) as client:
        response = start_upload(client, line_id, size=1000, **{field: value})
    assert response.status_code == 422
    assert response.json()["error"] == "invalid-header"
    assert response.json()["value"] == value


def test_upload_start_invalid_body_422(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge()
    with httpx.Client(base_url=url) as client:
        missing_size = start_upload(client, line_id)
        bad_sha = start_upload(client, line_id, size=10, sha256="abc")
        not_json = client.post(
            f"/v1/lines/{line_id}/uploads",
            content=b"{",
            headers={"Content-Type": "application/json"},
        )
    for response in (missing_size, bad_sha, not_json):
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "invalid-request"
    assert "size" in missing_size.json()["message"]


def test_upload_over_frame_limit_413(start_edge: EdgeFactory, line_id: str) -> None:
    url, settings = start_edge(max_message_bytes=1024 * 1024)
    with httpx.Client(base_url=url) as client:
        response = start_upload(client, line_id, size=1024 * 1024 + 1)
    assert response.status_code == 413
    assert response.json()["value"] == 1024 * 1024 + 1
    assert response.json()["limit"] == 1024 * 1024


def test_upload_total_capped_507(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge(ingest_upload_max_total_bytes=1024 * 1024)
    with httpx.Client(base_url=url) as client:
        first = start_upload(client, line_id, size=700 * 1024)
        assert first.status_code == 201
        refused = start_upload(client, line_id, size=700 * 1024)
        assert refused.status_code == 507
        assert refused.json()["error"] == "upload-storage-full"
        assert refused.json()["value"] == 1400 * 1024
        assert refused.json()["limit"] == 1024 * 1024
        aborted = client.delete(
            f"/v1/lines/{line_id}/uploads/{first.json()['upload_id']}"
        )
        assert aborted.status_code == 204
        assert start_upload(client, line_id, size=700 * 1024).status_code == 201


def test_abandoned_upload_expires(
    start_edge: EdgeFactory, line_id: str, tmp_path: Path
) -> None:
    url, _ = start_edge(ingest_upload_ttl_s=1.0, ingest_upload_chunk_bytes=64 * 1024)
    with httpx.Client(base_url=url) as client:
        upload_id = start_upload(client, line_id, size=100 * 1024).json()["upload_id"]
        base = f"/v1/lines/{line_id}/uploads/{upload_id}"
        assert (
            client.put(f"{base}/chunks/0", content=bytes(64 * 1024)).status_code == 200
        )
        assert (tmp_path / "uploads" / upload_id).is_dir()
        deadline = time.monotonic() + 10
        while (
            tmp_path / "uploads" / upload_id
        ).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (tmp_path / "uploads" / upload_id).exists()
        gone = client.get(base)
        assert gone.status_code == 404
        assert gone.json()["error"] == "upload-not-found"
        late = client.put(f"{base}/chunks/1", content=bytes(36 * 1024))
        assert late.status_code == 404
        metrics = client.get("/metrics").text
    assert "faultline_ingest_uploads_expired_total 1.0" in metrics


def test_upload_complete_checks_image(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge(ingest_upload_chunk_bytes=64 * 1024)
    data = b"\x89PNG\r\n\x1a\n" + bytes(100_000)  # no IEND chunk: truncated
    with httpx.Client(base_url=url) as client:
        upload_id = start_upload(client, line_id, size=len(data)).json()["upload_id"]
        base = f"/v1/lines/{line_id}/uploads/{upload_id}"
        assert (
            client.put(f"{base}/chunks/0", content=data[: 64 * 1024]).status_code == 200
        )
        assert (
            client.put(f"{base}/chunks/1", content=data[64 * 1024 :]).status_code == 200
        )
        rejected = client.post(f"{base}:complete")
        assert rejected.status_code == 415
        assert rejected.json()["error"] == "not-an-image"
        # The upload stays for inspection until it is aborted or expires.
        assert client.get(base).json()["missing"] == []
        assert client.delete(base).status_code == 204


def test_upload_checksum_mismatch_422(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge(ingest_upload_chunk_bytes=64 * 1024)
    image = noise_png(50_000)
    with httpx.Client(base_url=url) as client:
        started = start_upload(client, line_id, size=len(image), sha256="0" * 64)
        base = f"/v1/lines/{line_id}/uploads/{started.json()['upload_id']}"
        assert client.put(f"{base}/chunks/0", content=image).status_code == 200
        mismatch = client.post(f"{base}:complete")
    assert mismatch.status_code == 422
    assert mismatch.json()["error"] == "checksum-mismatch"
    assert mismatch.json()["value"] == hashlib.sha256(image).hexdigest()


def test_chunk_over_chunk_size_413(start_edge: EdgeFactory, line_id: str) -> None:
    url, _ = start_edge(ingest_upload_chunk_bytes=64 * 1024)
    with httpx.Client(base_url=url) as client:
        upload_id = start_upload(client, line_id, size=100 * 1024).json()["upload_id"]
        base = f"/v1/lines/{line_id}/uploads/{upload_id}"
        response = client.put(f"{base}/chunks/0", content=bytes(64 * 1024 + 1))
        out_of_range = client.put(f"{base}/chunks/2", content=bytes(10))
        not_a_number = client.put(f"{base}/chunks/first", content=bytes(10))
        missing = client.get(base).json()["missing"]
    assert response.status_code == 413
    assert response.json()["error"] == "invalid-chunk"
    assert response.json()["value"] == 64 * 1024 + 1
    assert response.json()["limit"] == 64 * 1024
    assert out_of_range.status_code == 422
    assert out_of_range.json()["limit"] == 1
    assert not_a_number.status_code == 422
    assert missing == [0, 1]
