"""Integration tests of the local Kafka launcher against a real broker.

The broker tests need java and mvn on PATH, and Maven needs Maven Central or a
local repository (~/.m2) holding the jars of deploy/kafka/pom.xml. The module
shares one broker under a temporary home, on ports picked at run time. The
fixture's finaliser stops it, so no process outlives the run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline import launcher as launcher_module
from pipeline.errors import BrokerError, ConfigError, DependencyError
from pipeline.launcher import LocalKafka
from pipeline.settings import Settings

pytestmark = pytest.mark.integration

JAVA = shutil.which("java")
requires_java = pytest.mark.skipif(JAVA is None, reason="java is not on PATH")
requires_jvm_tools = pytest.mark.skipif(
    JAVA is None or shutil.which("mvn") is None,
    reason="the broker tests need java and mvn on PATH",
)

# Small enough to produce quickly, but above Kafka's default message.max.bytes
# (1048588), so the test fails unless the launcher raised the broker limit.
MAX_MESSAGE_BYTES = 1024 * 1024
START_TIMEOUT_S = 120.0


def free_ports(count: int) -> list[int]:
    """Return count distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind(("127.0.0.1", 0))
            sockets.append(probe)
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def make_settings(home: Path, **overrides: object) -> Settings:
    port, controller_port = free_ports(2)
    values: dict[str, object] = {
        "home": home,
        "kafka_port": port,
        "kafka_controller_port": controller_port,
        "kafka_start_timeout_s": START_TIMEOUT_S,
        "max_message_bytes": MAX_MESSAGE_BYTES,
    }
    values.update(overrides)
    return Settings(**values)


def path_with_java_only(folder: Path) -> str:
    """Return a PATH value that finds java but no mvn."""
    assert JAVA is not None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "java").symlink_to(os.path.realpath(JAVA))
    return str(folder)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A launcher whose broker each test starts; the finaliser stops it."""
    local_kafka = LocalKafka(make_settings(tmp_path_factory.mktemp("kafka-home")))
    yield local_kafka
    local_kafka.stop()


@requires_jvm_tools
def test_start_reports_running_status(kafka: LocalKafka) -> None:
    bootstrap = kafka.start()

    status = kafka.status()
    assert bootstrap == f"127.0.0.1:{kafka.settings.kafka_port}"
    assert status.running
    assert status.pid is not None
    assert process_alive(status.pid)
    assert status.bootstrap == bootstrap
    assert status.data_dir == kafka.data_dir
    assert (status.data_dir / "meta.properties").is_file()
    assert status.log_path.is_file()
    assert status.topic_count is not None


@requires_jvm_tools
def test_second_start_reuses_broker(kafka: LocalKafka) -> None:
    kafka.start()
    first_pid = kafka.status().pid

    bootstrap = kafka.start()

    assert bootstrap == kafka.bootstrap
    assert kafka.status().pid == first_pid


@requires_jvm_tools
def test_topic_accepts_max_frame(kafka: LocalKafka) -> None:
    bootstrap = kafka.start()
    topic = f"launcher-test-{uuid.uuid4().hex}"
    admin = AdminClient({"bootstrap.servers": bootstrap})

    futures = admin.create_topics([NewTopic(topic, num_partitions=1)])
    futures[topic].result(timeout=30)

    assert topic in admin.list_topics(timeout=10).topics
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "message.max.bytes": MAX_MESSAGE_BYTES + 64 * 1024,
        }
    )
    delivered = []
    producer.produce(
        topic,
        value=os.urandom(MAX_MESSAGE_BYTES),
        key=b"camera-1",
        headers={"frame-id": uuid.uuid4().hex.encode()},
        on_delivery=lambda error, message: delivered.append(error),
    )
    assert producer.flush(30) == 0
    assert delivered == [None]
    assert kafka.status().topic_count >= 1


@requires_jvm_tools
def test_ensure_jars_reuses_resolved_jars(
    kafka: LocalKafka, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib_dir = kafka.ensure_jars()
    # With mvn off PATH, a second call can only succeed by reusing the jars.
    monkeypatch.setenv("PATH", path_with_java_only(tmp_path / "bin"))

    assert LocalKafka(kafka.settings).ensure_jars() == lib_dir
    assert any(lib_dir.glob("kafka_2.13-*.jar"))


@requires_jvm_tools
def test_stop_then_restart_keeps_data(kafka: LocalKafka) -> None:
    kafka.start()
    pid = kafka.status().pid
    cluster_id = (kafka.data_dir / "meta.properties").read_text()
    topic = f"launcher-test-{uuid.uuid4().hex}"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1)])[topic].result(timeout=30)
    del admin

    assert kafka.stop() is True

    assert pid is not None
    assert not process_alive(pid)
    assert not kafka.pid_path.exists()
    assert kafka.status().running is False
    assert kafka.stop() is False

    kafka.start()

    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    assert topic in admin.list_topics(timeout=10).topics
    assert (kafka.data_dir / "meta.properties").read_text() == cluster_id


@requires_jvm_tools
def test_start_timeout_stops_broker(kafka: LocalKafka) -> None:
    kafka.stop()
    impatient = LocalKafka(
        kafka.settings.model_copy(update={"kafka_start_timeout_s": 0.5})
    )

    with pytest.raises(BrokerError, match="no metadata response") as raised:
        impatient.start()

    assert str(impatient.log_path) in str(raised.value)
    assert "FAULTLINE_KAFKA_START_TIMEOUT_S" in str(raised.value)
    assert not impatient.pid_path.exists()
    assert impatient.status().running is False


@requires_jvm_tools
def test_broker_exit_names_taken_port(
    kafka: LocalKafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    kafka.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        # Let the early port check pass, so the broker itself hits the taken
        # port, as when another program binds it between check and start.
        real_port_free = launcher_module._port_free
        monkeypatch.setattr(
            launcher_module,
            "_port_free",
            lambda port: port == busy_port or real_port_free(port),
        )
        blocked = LocalKafka(
            kafka.settings.model_copy(update={"kafka_controller_port": busy_port})
        )

        with pytest.raises(BrokerError, match="exited with code") as raised:
            blocked.start()

    assert f"127.0.0.1:{busy_port}" in str(raised.value)
    assert "FAULTLINE_KAFKA_CONTROLLER_PORT" in str(raised.value)
    assert not blocked.pid_path.exists()


def test_start_rejects_taken_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        kafka = LocalKafka(make_settings(tmp_path, kafka_port=busy_port))

        with pytest.raises(BrokerError, match="already in use") as raised:
            kafka.start()

    assert f"127.0.0.1:{busy_port}" in str(raised.value)
    assert "FAULTLINE_KAFKA_PORT" in str(raised.value)


def test_same_ports_raise_config_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    clash = settings.model_copy(update={"kafka_controller_port": settings.kafka_port})

    with pytest.raises(ConfigError, match="FAULTLINE_KAFKA_CONTROLLER_PORT"):
        LocalKafka(clash)


def test_stale_pid_file_spares_process(tmp_path: Path) -> None:
    kafka = LocalKafka(make_settings(tmp_path))
    kafka.kafka_dir.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        kafka.pid_path.write_text(f"{sleeper.pid}\n")

        assert kafka.status().running is False
        kafka.pid_path.write_text(f"{sleeper.pid}\n")
        assert kafka.stop() is False

        assert sleeper.poll() is None
        assert not kafka.pid_path.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_missing_java_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    kafka = LocalKafka(make_settings(tmp_path / "home"))

    with pytest.raises(DependencyError, match="java not found") as raised:
        kafka.start()

    assert "openjdk-17-jre-headless" in str(raised.value)


@requires_java
def test_missing_mvn_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", path_with_java_only(tmp_path / "bin"))
    kafka = LocalKafka(make_settings(tmp_path / "home"))

    with pytest.raises(DependencyError, match="mvn not found") as raised:
        kafka.ensure_jars()

    assert "apt-get install maven" in str(raised.value)


@requires_java
def test_failing_mvn_raises_with_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", path_with_java_only(bin_dir))
    fake_mvn = bin_dir / "mvn"
    fake_mvn.write_text(
        "#!/bin/sh\necho '[ERROR] Could not resolve kafka_2.13 (offline)'\nexit 1\n"
    )
    fake_mvn.chmod(0o755)
    kafka = LocalKafka(make_settings(tmp_path / "home"))

    with pytest.raises(DependencyError, match="exit 1") as raised:
        kafka.ensure_jars()

    assert "Could not resolve kafka_2.13 (offline)" in str(raised.value)
    assert not kafka.lib_dir.exists()
