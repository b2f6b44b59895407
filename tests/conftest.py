"""Shared fixtures: a real Kafka broker, fresh ClickHouse databases, data paths.

The broker is, in order of preference: the one named by
``FAULTLINE_TEST_BOOTSTRAP``; a testcontainers Kafka when a Docker engine
responds; otherwise the local launcher on free ports under a temporary home.
Topic names carry a UUID, so tests never see each other's data. chDB allows
one data path per process, so in-process store tests share one path per run
and get a fresh database each.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("FAULTLINE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DEEPPCB = SHARED_DATA / "deeppcb"
PHOTOS = SHARED_DATA / "photos"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a test left a child process behind, and stop it."""
    import psutil

    leftovers = psutil.Process().children(recursive=True)
    if not leftovers:
        return
    names = ", ".join(f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in leftovers)
    for process in leftovers:
        process.kill()
    print(f"\ntests left processes running: {names}", file=sys.stderr)
    session.exitstatus = 1


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("FAULTLINE_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    from pipeline.launcher import LocalKafka
    from pipeline.settings import Settings

    home = tmp_path_factory.mktemp("kafka-home")
    settings = Settings(home=home, kafka_port=free_port(), kafka_controller_port=free_port())
    kafka = LocalKafka(settings)
    bootstrap = kafka.start()
    try:
        yield bootstrap
    finally:
        kafka.stop()


@pytest.fixture
def line_id() -> str:
    """A fresh line id, so every topic name of the test carries a UUID."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb") / "store"


@pytest.fixture
def store_settings(chdb_path: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Settings with a fresh ClickHouse database inside this run's chDB path."""
    from pipeline.settings import Settings

    url = os.environ.get("FAULTLINE_TEST_CLICKHOUSE_URL") or f"chdb://{chdb_path}"
    return Settings(home=tmp_path, clickhouse_url=url, clickhouse_database=f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def deeppcb() -> Path:
    if not (DEEPPCB / "data.yaml").is_file():
        pytest.skip(f"real PCB data not found at {DEEPPCB}; set FAULTLINE_SHARED_DATA")
    return DEEPPCB


@pytest.fixture
def photos() -> Path:
    if not PHOTOS.is_dir():
        pytest.skip(f"real photos not found at {PHOTOS}; set FAULTLINE_SHARED_DATA")
    return PHOTOS


class Processes:
    """Faultline subprocesses of one test, stopped by PID at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=REPO_ROOT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.running[name] = process
        return process

    def stop(self, name: str, timeout_s: float = 30.0) -> int | None:
        process = self.running.pop(name, None)
        if process is None:
            return None
        process.terminate()
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout=10)

    def kill(self, name: str) -> None:
        process = self.running.pop(name)
        process.kill()
        process.wait(timeout=10)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    runner = Processes(tmp_path)
    try:
        yield runner
    finally:
        runner.stop_all()
