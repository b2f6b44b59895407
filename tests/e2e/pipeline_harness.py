"""Run the worker and the sink as real processes against the test broker."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from pipeline.kafka import consumer_config, ensure_line_topics
from pipeline.settings import Settings
from pipeline.topics import DEADLETTER_TOPIC, frames_topic
from schemas import DeadLetter
from tests.conftest import Processes, free_port


class Pipeline:
    """A worker and a sink serving one line, each in its own process."""

    def __init__(
        self,
        processes: Processes,
        bootstrap: str,
        line: str,
        home: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.processes = processes
        self.line = line
        self.query_port = free_port()
        self.env = {
            "FAULTLINE_BOOTSTRAP_SERVERS": bootstrap,
            "FAULTLINE_HOME": str(home),
            "FAULTLINE_LINES": line,
            "FAULTLINE_QUERY_PORT": str(self.query_port),
            "FAULTLINE_WORKER_WEB_PORT": str(free_port()),
            "FAULTLINE_WORKER_APP_ID": f"worker-{uuid.uuid4().hex[:8]}",
            "FAULTLINE_SINK_GROUP_ID": f"sink-{uuid.uuid4().hex[:8]}",
            "FAULTLINE_METADATA_MAX_AGE_S": "2",
            "FAULTLINE_SINK_BATCH_TIMEOUT_S": "0.5",
            **(extra_env or {}),
        }
        self.settings = Settings(bootstrap_servers=bootstrap, home=home)
        ensure_line_topics(self.settings, line)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.query_port}"

    def start_worker(self) -> None:
        self.processes.start("worker", ["worker"], self.env)

    def start_sink(self) -> None:
        self.processes.start("sink", ["sink"], self.env)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            self.check_alive("sink")
            time.sleep(0.5)
        raise AssertionError(f"sink did not answer:\n{self.processes.log('sink')[-3000:]}")

    def check_alive(self, name: str) -> None:
        process = self.processes.running.get(name)
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{name} exited with {process.returncode}:\n{self.processes.log(name)[-4000:]}")

    def summary(self) -> dict[str, Any]:
        return httpx.get(f"{self.api}/v1/summary", params={"line": self.line}, timeout=30).json()

    def wait_for_rows(self, expected: int, timeout_s: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        summary: dict[str, Any] = {}
        while time.monotonic() < deadline:
            summary = self.summary()
            if summary["frames"] >= expected:
                return summary
            for name in ("worker", "sink"):
                self.check_alive(name)
            time.sleep(1.0)
        raise AssertionError(
            f"{summary.get('frames')} of {expected} rows after {timeout_s:.0f} s\n"
            f"worker log:\n{self.processes.log('worker')[-3000:]}"
        )

    def results(self, frame_ids: list[str]) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        for start in range(0, len(frame_ids), 200):
            chunk = frame_ids[start : start + 200]
            body = httpx.get(f"{self.api}/v1/results", params={"frame_id": chunk}, timeout=30).json()
            rows.update({row["frame_id"]: row for row in body["results"]})
        return rows

    def deadletters(self, timeout_s: float = 10.0) -> list[DeadLetter]:
        """Dead letters of this line's frames topic, read from the beginning."""
        from confluent_kafka import Consumer

        consumer = Consumer(consumer_config(self.settings, f"dl-reader-{uuid.uuid4().hex[:8]}"))
        consumer.subscribe([DEADLETTER_TOPIC])
        found: list[DeadLetter] = []
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                message = consumer.poll(0.5)
                if message is None or message.error():
                    continue
                record = DeadLetter.from_kafka(message.headers())
                if record.source_topic == frames_topic(self.line):
                    found.append(record)
        finally:
            consumer.close()
        return found
