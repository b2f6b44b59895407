"""The live fan-out without a broker: queues, filters, sessions and backfill."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pipeline.live import (
    CloseCode,
    HubFullError,
    LiveFilter,
    LiveHub,
    LiveMessage,
    LiveOptions,
    LiveSession,
    live_message,
)
from pipeline.metrics import EdgeMetrics
from pipeline.queries import Backfill
from schemas import Detection, ResultRecord, StageLatency


def record(line: str, index: int, fail: bool = False, run_id: str = "") -> ResultRecord:
    detections = (Detection(0, "open", 0.8, 1, 2, 30, 40),) if fail else ()
    return ResultRecord(
        frame_id=f"{line}-{index}",
        line_id=line,
        camera_id="cam-1",
        captured_at_ns=1_000_000_000 * index,
        ingested_at_ns=1_000_000_000 * index,
        inferred_at_ns=1_000_000_000 * index + 5,
        model_name="m",
        model_version="1",
        image_width=64,
        image_height=64,
        detections=detections,
        verdict="fail" if fail else "pass",
        latency=StageLatency(0.1, 0.01, 0.02, 0.2, 1),
        source_topic=f"frames.{line}",
        source_partition=0,
        source_offset=index,
        run_id=run_id,
    )


def message(line: str, index: int, fail: bool = False, run_id: str = "") -> LiveMessage:
    result = record(line, index, fail, run_id)
    return live_message(result, result.to_json().decode())


def new_hub(**options: Any) -> LiveHub:
    return LiveHub(LiveOptions(**options), EdgeMetrics(CollectorRegistry()))


class FakeSocket:
    """Collects what a session sends; setting ``gone`` ends the client's side."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.gone = asyncio.Event()
        self.block_sends = asyncio.Event()
        self.block_sends.set()

    async def send(self, text: str) -> None:
        await self.block_sends.wait()
        self.sent.append(json.loads(text))

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.gone.set()

    def types(self) -> list[str]:
        return [item["type"] for item in self.sent]

    def frame_ids(self) -> list[str]:
        return [
            item["result"]["frame_id"] for item in self.sent if item["type"] == "result"
        ]


async def wait_for(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def start_session(
    hub: LiveHub,
    socket: FakeSocket,
    live_filter: LiveFilter,
    since_ns: int | None = None,
    backfill: Callable[[], Awaitable[Backfill]] | None = None,
) -> asyncio.Task[None]:
    subscription = hub.subscribe(live_filter)
    session = LiveSession(
        hub=hub,
        subscription=subscription,
        send=socket.send,
        receive=socket.receive,
        close=socket.close,
        since_ns=since_ns,
        backfill=backfill,
    )
    return asyncio.create_task(session.run())


def test_subscription_drops_oldest_and_counts() -> None:
    async def scenario() -> None:
        hub = new_hub(queue_messages=3)
        subscription = hub.subscribe(LiveFilter(None, None))
        hub.publish([message("a", index) for index in range(5)])
        assert [m.frame_id for m in subscription.queue] == ["a-2", "a-3", "a-4"]
        assert subscription.missed_pending == 2
        assert subscription.missed_total == 2
        assert hub.metrics.dropped.labels("a")._value.get() == 2

    asyncio.run(scenario())


def test_filter_lines_verdict_and_run() -> None:
    only_fail_a = LiveFilter(frozenset({"a"}), "fail")
    assert only_fail_a.matches(message("a", 1, fail=True))
    assert not only_fail_a.matches(message("a", 2, fail=False))
    assert not only_fail_a.matches(message("b", 3, fail=True))
    assert not only_fail_a.matches(message("a", 4, fail=True, run_id="replay-1"))
    every_line = LiveFilter(None, None)
    assert every_line.matches(message("zz", 5))


def test_subscription_permits_limit_lines() -> None:
    async def scenario() -> None:
        hub = new_hub()
        subscription = hub.subscribe(
            LiveFilter(None, None), permits=lambda line: line == "a"
        )
        hub.publish([message("a", 1), message("b", 2), message("a", 3)])
        assert [m.frame_id for m in subscription.queue] == ["a-1", "a-3"]

    asyncio.run(scenario())


def test_hub_rejects_clients_over_limit() -> None:
    async def scenario() -> None:
        hub = new_hub(max_clients=2)
        hub.subscribe(LiveFilter(None, None))
        hub.subscribe(LiveFilter(None, None))
        with pytest.raises(HubFullError, match="--max-clients"):
            hub.subscribe(LiveFilter(None, None))

    asyncio.run(scenario())


def test_session_sends_hello_then_results() -> None:
    async def scenario() -> None:
        hub = new_hub()
        socket = FakeSocket()
        task = start_session(hub, socket, LiveFilter(frozenset({"a"}), "fail"))
        await wait_for(lambda: socket.sent)
        hub.publish(
            [message("a", 1, fail=True), message("a", 2), message("b", 3, fail=True)]
        )
        await wait_for(lambda: len(socket.sent) >= 2)
        await asyncio.sleep(0.05)
        assert socket.sent[0] == {
            "type": "hello",
            "lines": ["a"],
            "verdict": "fail",
            "run_id": "",
            "queue_messages": 1024,
            "heartbeat_s": 10.0,
        }
        assert socket.frame_ids() == ["a-1"]
        assert socket.sent[1]["result"]["detections"][0]["class_name"] == "open"
        socket.gone.set()
        await task
        assert not hub.subscriptions

    asyncio.run(scenario())


def test_session_reports_missed_before_next_message() -> None:
    async def scenario() -> None:
        hub = new_hub(queue_messages=4)
        socket = FakeSocket()
        task = start_session(hub, socket, LiveFilter(None, None))
        await wait_for(lambda: socket.sent)
        socket.block_sends.clear()  # the client stops reading
        hub.publish([message("a", 0)])
        await asyncio.sleep(0.05)  # the writer is now stuck sending a-0
        hub.publish([message("a", index) for index in range(1, 11)])
        socket.block_sends.set()
        await wait_for(lambda: "a-10" in socket.frame_ids())
        # a-1 .. a-6 were dropped; a-7 .. a-10 were still queued.
        assert socket.types()[1:] == [
            "result",
            "missed",
            "result",
            "result",
            "result",
            "result",
        ]
        assert socket.sent[2] == {"type": "missed", "count": 6, "total": 6}
        assert socket.frame_ids() == ["a-0", "a-7", "a-8", "a-9", "a-10"]
        socket.gone.set()
        await task

    asyncio.run(scenario())


def test_session_sends_heartbeats_when_idle() -> None:
    async def scenario() -> None:
        hub = new_hub(heartbeat_s=0.05)
        socket = FakeSocket()
        task = start_session(hub, socket, LiveFilter(None, None))
        await wait_for(lambda: socket.types().count("heartbeat") >= 2)
        heartbeat = socket.sent[1]
        assert heartbeat["type"] == "heartbeat"
        assert heartbeat["missed_total"] == 0
        assert heartbeat["time_ms"] > 0
        socket.gone.set()
        await task

    asyncio.run(scenario())


def test_session_closes_when_hub_closes() -> None:
    async def scenario() -> None:
        hub = new_hub()
        socket = FakeSocket()
        task = start_session(hub, socket, LiveFilter(None, None))
        await wait_for(lambda: socket.sent)
        hub.close(CloseCode.GOING_AWAY, "server shutting down")
        await asyncio.wait_for(task, 2)
        assert socket.closed == (1001, "server shutting down")

    asyncio.run(scenario())


def test_backfill_merges_store_and_recent() -> None:
    async def scenario() -> None:
        hub = new_hub()
        # The store has results 1-3; the live feed has seen 3-5, and 4-5
        # are not stored yet.
        hub.publish([message("a", index) for index in (3, 4, 5)])

        async def load() -> Backfill:
            return Backfill([record("a", index) for index in (1, 2, 3)], left_out=0)

        socket = FakeSocket()
        since_ns = 1_000_000_000
        task = start_session(
            hub, socket, LiveFilter(frozenset({"a"}), None), since_ns, load
        )
        await wait_for(lambda: "backfill" in socket.types())
        # A live copy of a backfilled result that arrives now is skipped.
        hub.publish([message("a", 5), message("a", 6)])
        await wait_for(lambda: "a-6" in socket.frame_ids())
        assert socket.frame_ids() == ["a-1", "a-2", "a-3", "a-4", "a-5", "a-6"]
        results = [item for item in socket.sent if item["type"] == "result"]
        assert all(item.get("backfill") is True for item in results[:5])
        assert "backfill" not in results[5]
        assert {"type": "backfill", "results": 5, "missed": 0} in socket.sent
        socket.gone.set()
        await task

    asyncio.run(scenario())


def test_backfill_over_limit_reports_missed() -> None:
    async def scenario() -> None:
        hub = new_hub(backfill_max_results=2)

        async def load() -> Backfill:
            return Backfill([record("a", index) for index in (7, 8)], left_out=5)

        socket = FakeSocket()
        task = start_session(hub, socket, LiveFilter(None, None), 0, load)
        await wait_for(lambda: "backfill" in socket.types())
        assert socket.types()[:5] == ["hello", "missed", "result", "result", "backfill"]
        assert socket.sent[1] == {"type": "missed", "count": 5, "total": 5}
        assert socket.frame_ids() == ["a-7", "a-8"]
        socket.gone.set()
        await task

    asyncio.run(scenario())


def test_publish_from_thread_waits_until_queued() -> None:
    async def scenario() -> None:
        hub = new_hub()
        hub.bind(asyncio.get_running_loop())
        subscription = hub.subscribe(LiveFilter(None, None))
        stop = threading.Event()
        published = await asyncio.to_thread(
            hub.publish_from_thread, [message("a", 1)], stop
        )
        assert published is True
        assert [m.frame_id for m in subscription.queue] == ["a-1"]
        assert hub.queued_messages() == 1

    asyncio.run(scenario())


def test_live_options_reject_invalid() -> None:
    with pytest.raises(ValueError, match="queue_messages"):
        LiveOptions(queue_messages=0)
    with pytest.raises(ValueError, match="heartbeat_s"):
        LiveOptions(heartbeat_s=0)
