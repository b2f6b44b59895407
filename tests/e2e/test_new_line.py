"""A line created while the worker runs is served without a restart."""

from __future__ import annotations

import uuid

import pytest

from ingest.feed import feed, simulator_frames
from pipeline.launcher import LocalKafka
from pipeline.settings import Settings
from tests.conftest import free_port
from tests.e2e.pipeline_harness import Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture
def own_broker(tmp_path):  # type: ignore[no-untyped-def]
    """A broker of this test alone: the worker below serves every line on it."""
    settings = Settings(home=tmp_path / "kafka", kafka_port=free_port(), kafka_controller_port=free_port())
    kafka = LocalKafka(settings)
    bootstrap = kafka.start()
    yield bootstrap
    kafka.stop()


def test_worker_picks_up_new_line(processes, own_broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = f"t-{uuid.uuid4().hex[:8]}"
    second = f"t-{uuid.uuid4().hex[:8]}"
    pipeline = Pipeline(processes, own_broker, first, tmp_path / "home")
    # Serve every line: the restriction to one line would hide the new one.
    pipeline.env["FAULTLINE_LINES"] = ""
    pipeline.start_sink()
    pipeline.start_worker()
    assert feed(pipeline.settings, first, simulator_frames(first, 6)).acked == 6
    pipeline.wait_for_rows(6)

    later = Pipeline(processes, own_broker, second, tmp_path / "home")  # creates its topics
    assert feed(later.settings, second, simulator_frames(second, 6)).acked == 6
    pipeline.line = second
    summary = pipeline.wait_for_rows(6, timeout_s=120)
    assert summary["lines"] == {second: 6}
    pipeline.check_alive("worker")
    assert "new line topics" in processes.log("worker")
