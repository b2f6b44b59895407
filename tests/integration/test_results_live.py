"""The live WebSocket feed of ``faultline serve`` against real Kafka and chDB.

Results are produced straight to ``results.<line>``; the edge runs as its own
process, so the test clients and the server do not share an interpreter.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from schemas import Detection, ResultRecord
from tests.conftest import Processes
from tests.integration.results_harness import (
    ResultProducer,
    ResultsEdge,
    produce_results,
    result_record,
)

pytestmark = pytest.mark.integration

RECV_TIMEOUT_S = 30.0
DEFECTS = (
    Detection(0, "open", 0.91, 10.0, 12.0, 40.0, 44.0),
    Detection(3, "spur", 0.66, 200.0, 210.0, 230.0, 236.0),
)


async def receive(socket: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(socket.recv(), RECV_TIMEOUT_S))


async def open_client(url: str, **options: Any) -> ClientConnection:
    client = await connect(
        url, proxy=None, compression=None, open_timeout=20, **options
    )
    hello = await receive(client)
    assert hello["type"] == "hello"
    return client


# --- 1 slow client and 20 fast ones ----------------------------------------

RESULTS = 3000
QUEUE_MESSAGES = 256
FAST_CLIENTS = 20
PRODUCE_RATE_PER_S = 600


def produce_paced(
    edge: ResultsEdge, records: Sequence[ResultRecord], done: threading.Event
) -> None:
    """Produce in chunks of a tenth of a second, at PRODUCE_RATE_PER_S."""
    chunk = PRODUCE_RATE_PER_S // 10
    producer = ResultProducer(edge.settings)
    try:
        for start in range(0, len(records), chunk):
            began = time.monotonic()
            producer.send(records[start : start + chunk])
            time.sleep(max(0.0, 0.1 - (time.monotonic() - began)))
    finally:
        done.set()


async def fast_client(url: str) -> tuple[list[str], int]:
    """Read every message as fast as it comes; return frame ids and missed count."""
    client = await open_client(url)
    frame_ids: list[str] = []
    missed = 0
    async with client:
        while len(frame_ids) + missed < RESULTS:
            message = await receive(client)
            if message["type"] == "result":
                frame_ids.append(message["result"]["frame_id"])
            elif message["type"] == "missed":
                missed += message["count"]
    return frame_ids, missed


def small_buffer_socket(port: int) -> socket.socket:
    """A connected client socket whose kernel receive buffer is small.

    Loopback TCP buffers grow to megabytes. A small one makes the server's
    transport fill after a few messages, as it would for a client on a slow
    link.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def live_scenario(
    edge: ResultsEdge, line: str, records: list[ResultRecord]
) -> dict[str, Any]:
    url = f"{edge.ws_url}?lines={line}"
    slow = await open_client(url, sock=small_buffer_socket(edge.port), max_queue=4)
    fast_tasks = [asyncio.create_task(fast_client(url)) for _ in range(FAST_CLIENTS)]
    await asyncio.sleep(1.0)  # every fast client has its hello by now
    assert (
        await asyncio.to_thread(edge.metric, "faultline_edge_ws_clients")
        == FAST_CLIENTS + 1
    )

    produced = threading.Event()
    producer = asyncio.create_task(
        asyncio.to_thread(produce_paced, edge, records, produced)
    )
    queued_samples: list[float] = []
    slow_ids: list[str] = []
    missed_messages: list[dict[str, Any]] = []

    def take(message: dict[str, Any]) -> None:
        if message["type"] == "result":
            slow_ids.append(message["result"]["frame_id"])
        elif message["type"] == "missed":
            missed_messages.append(message)

    # The slow client reads one message per second while results flow.
    while not produced.is_set():
        take(await receive(slow))
        queued_samples.append(
            await asyncio.to_thread(edge.metric, "faultline_edge_ws_queued_messages")
        )
        await asyncio.sleep(1.0)
    await producer
    fast_results = await asyncio.gather(*fast_tasks)
    queued_after_fast = await asyncio.to_thread(
        edge.metric, "faultline_edge_ws_queued_messages"
    )

    # Then it drains what is left: what it gets plus what it missed is all.
    async with slow:
        while len(slow_ids) + sum(m["count"] for m in missed_messages) < RESULTS:
            take(await receive(slow))
    return {
        "fast": fast_results,
        "slow_ids": slow_ids,
        "missed_messages": missed_messages,
        "queued_samples": queued_samples,
        "queued_after_fast": queued_after_fast,
    }


def test_slow_client_misses_fast_clients_get_all(
    kafka_bootstrap: str, processes: Processes, tmp_path: Path, line_id: str
) -> None:
    edge = ResultsEdge(
        processes, kafka_bootstrap, [line_id], tmp_path,
        extra_args=["--queue-messages", str(QUEUE_MESSAGES), "--heartbeat-s", "1"],
    )  # fmt: skip
    edge.start()
    records = [
        result_record(line_id, f"f{index:05d}", index, partition=index % 3,
                      detections=DEFECTS if index % 4 == 0 else ())
        for index in range(RESULTS)
    ]  # fmt: skip
    expected = {record.frame_id for record in records}

    outcome = asyncio.run(live_scenario(edge, line_id, records))

    for frame_ids, missed in outcome["fast"]:
        assert missed == 0
        assert len(frame_ids) == RESULTS
        assert set(frame_ids) == expected
    slow_ids = outcome["slow_ids"]
    missed_total = sum(message["count"] for message in outcome["missed_messages"])
    assert missed_total > 0
    assert len(slow_ids) + missed_total == RESULTS
    assert len(set(slow_ids)) == len(slow_ids)
    assert set(slow_ids) <= expected
    assert outcome["missed_messages"][-1]["total"] == missed_total
    # Memory: the queues never exceed their bound, and once the fast clients
    # are done only the slow client's queue is not empty.
    assert max(outcome["queued_samples"]) <= (FAST_CLIENTS + 1) * QUEUE_MESSAGES
    assert outcome["queued_after_fast"] <= QUEUE_MESSAGES
    labels = f'line="{line_id}"'
    assert (
        edge.metric("faultline_edge_ws_messages_dropped_total", labels) == missed_total
    )
    assert edge.metric(
        "faultline_edge_ws_messages_sent_total", labels
    ) == FAST_CLIENTS * RESULTS + len(slow_ids)
    assert edge.metric("faultline_edge_results_consumed_total", labels) == RESULTS


# --- filters -----------------------------------------------------------------


async def collect(
    url: str, expected: int, settle_s: float = 1.5
) -> list[dict[str, Any]]:
    """Return the ``expected`` results of a client and any more within settle_s."""
    client = await open_client(url)
    results: list[dict[str, Any]] = []
    async with client:
        while len(results) < expected:
            message = await receive(client)
            if message["type"] == "result":
                results.append(message["result"])
        deadline = time.monotonic() + settle_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = json.loads(await asyncio.wait_for(client.recv(), remaining))
            except TimeoutError:
                break
            if message["type"] == "result":
                results.append(message["result"])
    return results


def test_live_filters_by_line_verdict_and_run(
    kafka_bootstrap: str, processes: Processes, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:12]
    line_a, line_b = f"a-{suffix}", f"b-{suffix}"
    edge = ResultsEdge(
        processes,
        kafka_bootstrap,
        [line_a, line_b],
        tmp_path,
        extra_args=["--heartbeat-s", "0.5"],
    )
    edge.start()
    records_a = [
        result_record(
            line_a, f"a{index}", index, detections=DEFECTS if index % 2 else ()
        )
        for index in range(10)
    ]
    records_b = [
        result_record(
            line_b, f"b{index}", index, detections=DEFECTS if index < 2 else ()
        )
        for index in range(6)
    ]
    replay = [result_record(line_a, "a0", 0, run_id="replay-7", model_version="2.0")]

    async def scenario() -> list[list[dict[str, Any]]]:
        base = edge.ws_url
        tasks = [
            asyncio.create_task(collect(f"{base}?lines={line_a}&verdict=fail", 5)),
            asyncio.create_task(collect(f"{base}?lines={line_b}", 6)),
            asyncio.create_task(collect(f"{base}?lines={line_a},{line_b}", 16)),
            asyncio.create_task(collect(f"{base}?lines={line_a}&run_id=replay-7", 1)),
        ]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(
            produce_results, edge.settings, records_a + records_b + replay
        )
        return await asyncio.gather(*tasks)

    fails_a, all_b, both, replayed = asyncio.run(scenario())
    assert sorted(r["frame_id"] for r in fails_a) == ["a1", "a3", "a5", "a7", "a9"]
    assert all(r["verdict"] == "fail" for r in fails_a)
    assert sorted(r["frame_id"] for r in all_b) == [f"b{index}" for index in range(6)]
    assert len(both) == 16
    assert {r["run_id"] for r in both} == {""}
    assert [(r["frame_id"], r["model_version"]) for r in replayed] == [("a0", "2.0")]
    assert fails_a[0]["detections"][0] == {
        "class_id": 0, "class_name": "open", "confidence": 0.91,
        "x1": 10.0, "y1": 12.0, "x2": 40.0, "y2": 44.0,
    }  # fmt: skip
    assert (
        edge.metric("faultline_edge_results_consumed_total", f'line="{line_a}"') == 11
    )


# --- reconnect with since= -----------------------------------------------------


async def backfill_of(
    url: str, live_records: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Connect with since=, return the backfilled results and the end marker."""
    client = await open_client(url)
    backfilled: list[dict[str, Any]] = []
    async with client:
        while True:
            message = await receive(client)
            if message["type"] == "backfill":
                return backfilled, message
            assert message["type"] == "result", message
            assert message.get("backfill") is True
            backfilled.append(message["result"])


def batch(
    line: str, name: str, count: int, inferred_from_ns: int
) -> list[ResultRecord]:
    return [
        result_record(
            line,
            f"{name}{index}",
            index,
            inferred_at_ns=inferred_from_ns + index * 1_000_000,
        )
        for index in range(count)
    ]


def wait_stored(
    edge: ResultsEdge, line: str, count: int, timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = httpx.get(
            f"{edge.url}/v1/summary", params={"line": line}, timeout=10
        ).json()
        if body["frames"] >= count:
            return
        time.sleep(0.3)
    raise AssertionError(
        f"the sink did not store {count} results of {line} in {timeout_s:.0f} s"
    )


def test_reconnect_since_backfills_missed(
    kafka_bootstrap: str, processes: Processes, tmp_path: Path, line_id: str
) -> None:
    edge = ResultsEdge(
        processes,
        kafka_bootstrap,
        [line_id],
        tmp_path,
        extra_args=["--heartbeat-s", "1"],
    )
    edge.start()
    now = time.time_ns()
    first, second = (
        batch(line_id, "first", 10, now),
        batch(line_id, "second", 10, now + 10**9),
    )
    since_ms = (now + 10**9) // 1_000_000
    url = f"{edge.ws_url}?lines={line_id}"

    async def before_and_during_outage() -> tuple[
        list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]
    ]:
        live_task = asyncio.create_task(collect(url, 10, settle_s=0.5))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(produce_results, edge.settings, first)
        live = await live_task
        # While no client is connected, the second batch arrives; the client
        # comes back at once, before the sink may have stored it.
        await asyncio.to_thread(produce_results, edge.settings, second)
        await asyncio.sleep(0.5)
        backfilled, marker = await backfill_of(f"{url}&since={since_ms}")
        return live, backfilled, marker

    live, backfilled, marker = asyncio.run(before_and_during_outage())
    assert sorted(r["frame_id"] for r in live) == sorted(r.frame_id for r in first)
    assert [r["frame_id"] for r in backfilled] == [r.frame_id for r in second]
    assert marker == {"type": "backfill", "results": 10, "missed": 0}

    # After a restart the edge keeps nothing in memory, so the backfill now
    # comes from ClickHouse alone.
    wait_stored(edge, line_id, 20)
    processes.stop("serve")
    edge.start()
    stored, marker = asyncio.run(backfill_of(f"{url}&since={since_ms}"))
    assert [r["frame_id"] for r in stored] == [r.frame_id for r in second]
    assert marker == {"type": "backfill", "results": 10, "missed": 0}
    assert stored[3] == json.loads(second[3].to_json())
    everything, _ = asyncio.run(
        backfill_of(f"{url}&since={now // 1_000_000}&verdict=pass")
    )
    assert len(everything) == 20
