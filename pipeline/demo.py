"""``faultline demo``: the whole pipeline on one machine in one command.

Starts the local Kafka broker (unless one responds already), creates the
topics of two lines, starts a worker and the sink as child processes, feeds
simulator frames (or a folder) to every line, shows progress, and ends with
the summary read back from ClickHouse. Simulator frames carry their ground
truth, so the demo also reports recall and precision of the detections.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ingest.feed import FeedReport, FrameProducer, SourceFrame, folder_frames
from pipeline.errors import BrokerError, FaultlineError
from pipeline.kafka import ensure_line_topics
from pipeline.report import format_summary
from pipeline.settings import Settings

log = logging.getLogger(__name__)

MATCH_IOU = 0.5


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Score:
    """Detections matched to ground truth by class and IoU >= 0.5."""

    truths: int = 0
    detections: int = 0
    matched: int = 0

    def add(self, truth: list[tuple[int, tuple[float, float, float, float]]], row: dict[str, Any]) -> None:
        found = [
            (int(c), (x1, y1, x2, y2))
            for c, x1, y1, x2, y2 in zip(row["class_ids"], row["x1"], row["y1"], row["x2"], row["y2"], strict=True)
        ]
        self.truths += len(truth)
        self.detections += len(found)
        unused = list(found)
        for class_id, box in truth:
            best = max(
                (d for d in unused if d[0] == class_id), key=lambda d: _iou(box, d[1]), default=None
            )
            if best is not None and _iou(box, best[1]) >= MATCH_IOU:
                unused.remove(best)
                self.matched += 1

    def line(self) -> str:
        recall = self.matched / self.truths if self.truths else 0.0
        precision = self.matched / self.detections if self.detections else 0.0
        return (
            f"against simulator ground truth: recall {recall:.2f} "
            f"({self.matched}/{self.truths} defects), precision {precision:.2f}"
        )


@dataclass
class Demo:
    settings: Settings
    lines: list[str]
    frames: int = 60
    fps: float = 10.0
    source: str = "simulator"
    keep_running: bool = False
    _children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _truth: dict[str, list[tuple[int, tuple[float, float, float, float]]]] = field(default_factory=dict)
    _reports: dict[str, FeedReport] = field(default_factory=dict)

    def run(self) -> int:
        from pipeline.launcher import LocalKafka

        kafka = LocalKafka(self.settings)
        started_kafka = not kafka.status().running
        bootstrap = kafka.start()
        self.settings = self.settings.model_copy(update={"bootstrap_servers": bootstrap})
        print(f"Kafka: {bootstrap}")
        try:
            for line in self.lines:
                ensure_line_topics(self.settings, line)
            self._start_children()
            reports = self._feed_all()
            return self._finish(reports)
        finally:
            if not self.keep_running:
                self._stop_children()
                if started_kafka:
                    kafka.stop()
            else:
                print(f"left running: Kafka, worker pid {self._children['worker'].pid}, "
                      f"sink pid {self._children['sink'].pid}")

    # children

    def _start_children(self) -> None:
        logs = self.settings.home_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "FAULTLINE_HOME": str(self.settings.home_dir),
            "FAULTLINE_BOOTSTRAP_SERVERS": self.settings.bootstrap_servers,
            "FAULTLINE_LINES": ",".join(self.lines),
        }
        for name in ("sink", "worker"):
            out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
            self._children[name] = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", name], env=env, stdout=out, stderr=subprocess.STDOUT
            )
            print(f"started {name} (pid {self._children[name].pid}, log {logs / f'{name}.log'})")
        self._wait_for_api()

    def _api(self) -> str:
        return f"http://{self.settings.query_host}:{self.settings.query_port}"

    def _wait_for_api(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_children()
            try:
                if httpx.get(f"{self._api()}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise BrokerError(f"the sink did not respond on {self._api()} within {timeout_s:.0f} s")

    def _check_children(self) -> None:
        for name, child in self._children.items():
            if child.poll() is not None:
                raise FaultlineError(
                    f"the {name} exited with status {child.returncode}; see "
                    f"{self.settings.home_dir / 'logs' / (name + '.log')}"
                )

    def _stop_children(self) -> None:
        for name, child in reversed(list(self._children.items())):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within 30 s; killing pid %d", name, child.pid)
                    child.kill()
                    child.wait()

    # frames

    def _frames_for(self, line: str, index: int) -> list[SourceFrame]:
        if self.source != "simulator":
            return list(folder_frames(Path(self.source), camera_id="cam-1", limit=self.frames))
        from ingest.simulator import LineSimulator

        frames = []
        run = uuid.uuid4().hex[:6]
        for shot in LineSimulator(line, cameras=2, seed=index).take(self.frames):
            frame_id = f"{line}-{run}-{shot.sequence:05d}"
            self._truth[frame_id] = [
                (d.class_id, (d.x1, d.y1, d.x2, d.y2)) for d in shot.frame.defects
            ]
            frames.append(SourceFrame(shot.camera_id, shot.payload, shot.content_type, frame_id, frame_id))
        return frames

    def _feed_all(self) -> dict[str, FeedReport]:
        reports = self._reports = {line: FeedReport() for line in self.lines}
        plans = {line: self._frames_for(line, i) for i, line in enumerate(self.lines)}
        if self.source != "simulator":
            # The same folder on two lines: frame ids must stay unique per line.
            plans = {
                line: [SourceFrame(f.camera_id, f.payload, f.content_type, f.label, f"{line}-{f.frame_id}") for f in frames]
                for line, frames in plans.items()
            }

        def feed_line(line: str) -> None:
            producer = FrameProducer(self.settings)
            interval = 1.0 / self.fps if self.fps > 0 else 0.0
            for frame in plans[line]:
                producer.send(line, frame, reports[line])
                if interval:
                    time.sleep(interval)
            producer.flush()

        threads = [threading.Thread(target=feed_line, args=(line,), daemon=True) for line in self.lines]
        for thread in threads:
            thread.start()
        total = self.frames * len(self.lines)
        stored = 0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            self._check_children()
            fed = sum(r.acked for r in reports.values())
            stored = self._stored()
            print(f"\rfed {fed}/{total} frames, stored {stored} results", end="", flush=True)
            if fed == total and not any(t.is_alive() for t in threads) and stored >= total:
                break
            time.sleep(1.0)
        print()
        if stored < total:
            print(f"warning: {total - stored} frames have no stored result yet (dead letters or still in flight)")
        return reports

    def _stored(self) -> int:
        try:
            body = httpx.get(f"{self._api()}/v1/results", params={"frame_id": list(self._ids())}, timeout=30).json()
        except httpx.HTTPError:
            return 0
        return len(body["results"])

    def _ids(self) -> list[str]:
        return [frame_id for report in self._reports.values() for frame_id in report.frame_ids]

    def _finish(self, reports: dict[str, FeedReport]) -> int:
        summary = httpx.get(f"{self._api()}/v1/summary", timeout=30).json()
        print("\nSummary of every result in the store (faultline query prints it again):")
        print(format_summary(summary))
        if self._truth:
            rows = httpx.get(f"{self._api()}/v1/results", params={"frame_id": self._ids()}, timeout=30).json()
            score = Score()
            for row in rows["results"]:
                score.add(self._truth[row["frame_id"]], row)
            print(score.line())
        failed = sum(r.failed for r in reports.values())
        return 0 if failed == 0 else 1
