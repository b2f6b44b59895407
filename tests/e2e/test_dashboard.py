"""The dashboard page in real headless Chromium against ``faultline serve``.

Debian's ``chromium`` package provides the browser (Playwright drives it
through ``executable_path``; browser downloads are not possible here). Frames
from the line simulator go to ``frames.<line>`` and synthetic results to
``results.<line>``, so no inference worker runs. A screenshot of each run is
saved under ``test-artifacts/``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, Processes
from tests.integration.results_harness import (
    ResultProducer,
    ResultsEdge,
    produce_frames,
    result_of_frame,
    result_record,
)

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "dashboard-viewer"
FAILING_FRAMES_PER_LINE = 3
PASSING_RESULTS_PER_LINE = 5
SHOW_WITHIN_MS = 2000

# Counts the pure red pixels that only the drawn boxes have, since the
# simulator's frames are black and white.
COUNT_RED_PIXELS = """(canvas) => {
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let red = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] > 200 && data[i + 1] < 60 && data[i + 2] < 60) red += 1;
  }
  return red;
}"""


@dataclass
class Dashboard:
    edge: ResultsEdge
    lines: list[str]
    context: Any


@pytest.fixture(scope="module")
def dashboard(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dashboard]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"Chromium not found at {CHROMIUM}: install Debian's chromium package "
            "(apt-get install chromium chromium-driver) to run the dashboard test"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="playwright is not installed (requirements/test.txt)",
    )
    home = tmp_path_factory.mktemp("dashboard")
    lines = [f"t-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    tokens = {"tokens": [{"token": TOKEN, "roles": ["view"], "lines": ["*"]}]}
    processes = Processes(home)
    try:
        edge = ResultsEdge(
            processes, kafka_bootstrap, lines, home,
            extra_args=["--heartbeat-s", "2"],
            extra_env={"FAULTLINE_TOKENS": json.dumps(tokens)},
        )  # fmt: skip
        edge.start()
        with sync_api.sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(home / "chromium-profile"),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 1300},
            )
            try:
                yield Dashboard(edge, lines, context)
            finally:
                context.close()
    finally:
        processes.stop_all()


def open_page(dashboard: Dashboard, token: str) -> Any:
    page = dashboard.context.new_page()
    page.console_lines = []
    page.on(
        "console",
        lambda message: page.console_lines.append(f"{message.type}: {message.text}"),
    )
    page.goto(f"{dashboard.edge.url}/?lines={','.join(dashboard.lines)}")
    page.fill("#token", token)
    page.click("button[type=submit]")
    return page


def save_failure(page: Any) -> None:
    """Keep a screenshot and the browser console of a failed wait."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-failed.png"), full_page=True)
    (ARTIFACTS / "dashboard-console.txt").write_text("\n".join(page.console_lines))


def test_dashboard_shows_tiles_and_failures(dashboard: Dashboard) -> None:
    edge = dashboard.edge
    frames = {
        line: produce_frames(edge.settings, line, FAILING_FRAMES_PER_LINE)
        for line in dashboard.lines
    }
    failing = [
        result_of_frame(line, frame)
        for line, produced in frames.items()
        for frame in produced
    ]
    passing = [
        result_record(line, f"pass-{line}-{index}", 1000 + index)
        for line in dashboard.lines
        for index in range(PASSING_RESULTS_PER_LINE)
    ]
    producer = ResultProducer(edge.settings)
    page = open_page(dashboard, TOKEN)
    page.wait_for_selector("#connection[data-state=live]", timeout=15000)

    started = time.monotonic()
    producer.send(passing + failing)
    tile_selectors = [
        f".tile[data-line='{line}'] canvas.last-fail" for line in dashboard.lines
    ]
    try:
        page.wait_for_function(
            """([selectors, failures]) =>
                 selectors.every((s) => Number(document.querySelector(s)?.dataset.boxes) > 0)
                 && document.querySelectorAll("#failures li").length >= failures""",
            arg=[tile_selectors, len(failing)],
            timeout=SHOW_WITHIN_MS,
        )
    except Exception:
        save_failure(page)
        raise
    shown_after_s = time.monotonic() - started

    for line in dashboard.lines:
        tile = page.locator(f".tile[data-line='{line}']")
        assert tile.locator(".frames").inner_text() == str(
            FAILING_FRAMES_PER_LINE + PASSING_RESULTS_PER_LINE
        )
        assert tile.locator(".rate").inner_text() != "0.0 frames/s"
        failed_share = FAILING_FRAMES_PER_LINE / (
            FAILING_FRAMES_PER_LINE + PASSING_RESULTS_PER_LINE
        )
        assert (
            tile.locator(".defect-rate")
            .inner_text()
            .startswith(f"{100 * failed_share:.1f} %")
        )
        canvas = tile.locator("canvas.last-fail")
        shown_frame = canvas.get_attribute("data-frame-id")
        line_results = {
            result.frame_id: result for result in failing if result.line_id == line
        }
        assert shown_frame in line_results
        assert canvas.get_attribute("data-boxes") == str(
            len(line_results[shown_frame].detections)
        )
        assert canvas.evaluate(COUNT_RED_PIXELS) > 100

    items = page.locator("#failures li")
    assert items.count() == len(failing)
    assert {
        items.nth(i).get_attribute("data-frame-id") for i in range(items.count())
    } == {result.frame_id for result in failing}
    first_thumb = items.nth(0).locator("canvas.thumb")
    page.wait_for_function(
        "(canvas) => Number(canvas.dataset.boxes) > 0",
        arg=first_thumb.element_handle(),
        timeout=5000,
    )
    assert first_thumb.evaluate(COUNT_RED_PIXELS) > 10

    # The chart reads the per-minute rollup once the sink stored the results.
    page.wait_for_function(
        "() => Number(document.querySelector('#chart').dataset.points) >= 2",
        timeout=15000,
    )
    assert page.locator("#chart-legend span").all_inner_texts() == sorted(
        dashboard.lines
    )
    assert page.locator("#connection").get_attribute("data-state") == "live"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    page.close()
    assert shown_after_s < SHOW_WITHIN_MS / 1000


def test_dashboard_reports_rejected_token(dashboard: Dashboard) -> None:
    page = open_page(dashboard, "not-a-token")
    page.wait_for_selector("#connection[data-state=unauthorized]", timeout=10000)
    assert "4401" in page.locator("#connection").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-rejected-token.png"))
    page.close()
