"""Unit tests of the chunked upload store: ids, chunks, expiry and the size caps."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from ingest.uploads import (
    ChecksumMismatch,
    InvalidChunk,
    InvalidUpload,
    InvalidUploadId,
    UploadBusy,
    UploadExpired,
    UploadIncomplete,
    UploadNotFound,
    UploadStorageFull,
    UploadStore,
    UploadTooLarge,
)

CHUNK = 64 * 1024
FRAME = {
    "camera_id": "cam-1",
    "content_type": "image/png",
    "captured_at_ns": 1,
    "frame_id": None,
}


def make_store(root: Path, **overrides: float) -> UploadStore:
    options = {
        "chunk_bytes": CHUNK,
        "max_upload_bytes": 1024 * 1024,
        "max_total_bytes": 2 * 1024 * 1024,
        "ttl_s": 60.0,
    }
    options.update(overrides)
    return UploadStore(root, **options)  # type: ignore[arg-type]


def chunks_of(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def test_upload_out_of_order_assembles(tmp_path: Path) -> None:
    store = make_store(tmp_path / "uploads")
    data = os.urandom(5 * CHUNK + 123)
    status = store.start("line-1", len(data), FRAME, hashlib.sha256(data).hexdigest())
    upload_id = status.meta.upload_id
    assert len(upload_id) == 32
    assert status.meta.chunk_count == 6
    assert status.missing == [0, 1, 2, 3, 4, 5]
    pieces = chunks_of(data)
    for index in (5, 2, 0, 4):
        status = store.put_chunk("line-1", upload_id, index, pieces[index])
    assert status.missing == [1, 3]
    # Retrying a chunk replaces it; a retry with the same bytes changes nothing.
    store.put_chunk("line-1", upload_id, 1, os.urandom(CHUNK))
    store.put_chunk("line-1", upload_id, 1, pieces[1])
    store.put_chunk("line-1", upload_id, 2, pieces[2])
    status = store.put_chunk("line-1", upload_id, 3, pieces[3])
    assert status.missing == []
    assert status.received == [0, 1, 2, 3, 4, 5]
    meta, assembled = store.assemble("line-1", upload_id)
    assert assembled == data
    assert meta.frame == FRAME
    store.finish(upload_id)
    assert not (tmp_path / "uploads" / upload_id).exists()
    with pytest.raises(UploadNotFound):
        store.status("line-1", upload_id)


def test_upload_incomplete_names_missing(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    upload_id = store.start("line-1", 3 * CHUNK, FRAME).meta.upload_id
    store.put_chunk("line-1", upload_id, 1, bytes(CHUNK))
    with pytest.raises(UploadIncomplete) as caught:
        store.assemble("line-1", upload_id)
    assert caught.value.value == [0, 2]
    assert "0, 2" in str(caught.value)


@pytest.mark.parametrize(
    ("index", "size"),
    [(0, CHUNK - 1), (0, CHUNK + 1), (1, CHUNK), (2, 10), (-1, CHUNK)],
)
def test_chunk_wrong_size_or_index(tmp_path: Path, index: int, size: int) -> None:
    store = make_store(tmp_path)
    upload_id = store.start("line-1", CHUNK + 100, FRAME).meta.upload_id
    with pytest.raises(InvalidChunk):
        store.put_chunk("line-1", upload_id, index, bytes(size))


def test_upload_larger_than_frame_rejected(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(UploadTooLarge) as caught:
        store.start("line-1", 1024 * 1024 + 1, FRAME)
    assert caught.value.value == 1024 * 1024 + 1
    assert caught.value.limit == 1024 * 1024
    with pytest.raises(InvalidUpload):
        store.start("line-1", 0, FRAME)


def test_total_size_capped(tmp_path: Path) -> None:
    store = make_store(tmp_path, max_total_bytes=1536 * 1024)
    first = store.start("line-1", 1024 * 1024, FRAME).meta.upload_id
    with pytest.raises(UploadStorageFull) as caught:
        store.start("line-2", 1024 * 1024, FRAME)
    assert caught.value.value == 2 * 1024 * 1024
    assert caught.value.limit == 1536 * 1024
    store.abort("line-1", first)
    store.start("line-2", 1024 * 1024, FRAME)


@pytest.mark.parametrize(
    "upload_id",
    ["../../etc", "/etc/passwd", "..", ".", "", "a" * 32 + "/..", "A" * 32, "%2e%2e",
     "0" * 31, "0" * 33, "..\\..\\x", "0" * 30 + "/."],
)  # fmt: skip
def test_path_ids_rejected(tmp_path: Path, upload_id: str) -> None:
    root = tmp_path / "uploads"
    store = make_store(root)
    canary = tmp_path / "canary"
    canary.write_bytes(b"keep")
    for call in (
        lambda: store.status("line-1", upload_id),
        lambda: store.put_chunk("line-1", upload_id, 0, bytes(CHUNK)),
        lambda: store.assemble("line-1", upload_id),
        lambda: store.abort("line-1", upload_id),
        lambda: store.finish(upload_id),
        lambda: store.release(upload_id),
    ):
        with pytest.raises(InvalidUploadId):
            call()
    assert canary.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary", "uploads"]
    assert list(root.iterdir()) == []


def test_upload_of_other_line_not_found(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    upload_id = store.start("line-1", CHUNK, FRAME).meta.upload_id
    with pytest.raises(UploadNotFound):
        store.status("line-2", upload_id)
    with pytest.raises(UploadNotFound):
        store.put_chunk("line-2", upload_id, 0, bytes(CHUNK))


def test_abandoned_upload_expires(tmp_path: Path) -> None:
    store = make_store(tmp_path, ttl_s=0.5)
    upload_id = store.start("line-1", 2 * CHUNK, FRAME).meta.upload_id
    store.put_chunk("line-1", upload_id, 0, bytes(CHUNK))
    assert store.totals().open_uploads == 1
    time.sleep(0.6)
    with pytest.raises(UploadExpired):
        store.put_chunk("line-1", upload_id, 1, bytes(CHUNK))
    totals = store.remove_expired()
    assert totals.expired == [upload_id]
    assert totals.open_uploads == 0
    assert not (tmp_path / upload_id).exists()
    with pytest.raises(UploadNotFound):
        store.status("line-1", upload_id)


def test_chunk_put_extends_expiry(tmp_path: Path) -> None:
    store = make_store(tmp_path, ttl_s=0.6)
    upload_id = store.start("line-1", 2 * CHUNK, FRAME).meta.upload_id
    time.sleep(0.4)
    store.put_chunk("line-1", upload_id, 0, bytes(CHUNK))
    time.sleep(0.4)
    assert store.status("line-1", upload_id).missing == [1]
    assert store.remove_expired().expired == []


def test_expired_budget_released(tmp_path: Path) -> None:
    store = make_store(tmp_path, max_total_bytes=1024 * 1024, ttl_s=60.0)
    store.start("line-1", 1024 * 1024, FRAME)
    with pytest.raises(UploadStorageFull):
        store.start("line-1", CHUNK, FRAME)
    later_ns = time.time_ns() + 120 * 10**9
    assert len(store.remove_expired(now_ns=later_ns).expired) == 1
    store.start("line-1", CHUNK, FRAME)


def test_concurrent_complete_busy(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    upload_id = store.start("line-1", CHUNK, FRAME).meta.upload_id
    store.put_chunk("line-1", upload_id, 0, bytes(CHUNK))
    store.assemble("line-1", upload_id)
    with pytest.raises(UploadBusy):
        store.assemble("line-1", upload_id)
    store.release(upload_id)
    _, assembled = store.assemble("line-1", upload_id)
    assert assembled == bytes(CHUNK)


def test_checksum_mismatch_keeps_upload(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    data = os.urandom(CHUNK)
    upload_id = store.start(
        "line-1", CHUNK, FRAME, hashlib.sha256(data).hexdigest()
    ).meta.upload_id
    store.put_chunk("line-1", upload_id, 0, bytes(CHUNK))
    with pytest.raises(ChecksumMismatch) as caught:
        store.assemble("line-1", upload_id)
    assert caught.value.limit == hashlib.sha256(data).hexdigest()
    store.put_chunk("line-1", upload_id, 0, data)
    assert store.assemble("line-1", upload_id)[1] == data


def test_stray_entries_removed(tmp_path: Path) -> None:
    store = make_store(tmp_path, ttl_s=0.2)
    stray = tmp_path / ("f" * 32)
    stray.mkdir()
    time.sleep(0.3)
    store.remove_expired()
    assert not stray.exists()
