"""Local single-node Apache Kafka broker (KRaft) for quick starts and tests.

The launcher runs the real broker from jars that Maven resolves from
``deploy/kafka/pom.xml``. Everything lives under ``<home>/kafka/``::

    lib/                jars, plus .pom-sha256 naming the pom they came from
    server.properties   rewritten at each start from the settings
    data/               log.dirs, formatted once by StorageTool
    logs/server.log     the broker log (deploy/kafka/log4j2.yaml)
    logs/kafka.out      the JVM's stdout and stderr (warnings and crashes)
    kafka.pid           pid of the broker this launcher started
    launcher.lock       held while start or stop runs

Invariants:

- ``stop`` signals only the pid in ``kafka.pid``, and only after the
  process's command line shows ``kafka.Kafka`` with this home's
  ``server.properties``, so a stale pid file never ends an unrelated process.
  The one other process the launcher signals is a broker that ``start`` has
  just launched and that failed to become ready.
- A broker counts as ready only when its metadata response carries the
  cluster id stored in ``data/meta.properties``, so another broker on the same
  port is never mistaken for ours.
- The quorum is static (``controller.quorum.voters``). The broker reads the
  controller port from server.properties at each start, so changing
  ``FAULTLINE_KAFKA_CONTROLLER_PORT`` needs no reformat.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from pipeline.errors import BrokerError, ConfigError, DependencyError
from pipeline.settings import REPO_ROOT, Settings

if TYPE_CHECKING:
    from confluent_kafka.admin import ClusterMetadata

__all__ = ["KafkaStatus", "LocalKafka"]

logger = logging.getLogger(__name__)

# NOTE: deploy/ is not packaged in the wheel, so the launcher works only from a
# source checkout or an editable install.
POM_PATH = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
LOG4J_CONFIG_PATH = REPO_ROOT / "deploy" / "kafka" / "log4j2.yaml"

KAFKA_MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
NODE_ID = 1
MIN_JAVA_VERSION = 17  # Kafka 4.x brokers need Java 17 or newer.

# A 1 GiB heap is enough for one local broker and keeps test runs, which start
# several brokers in a row, light.
BROKER_JVM_OPTIONS = ("-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true")
TOOL_JVM_OPTIONS = ("-Xmx256m",)

# Room above max_message_bytes for record headers, the key and batch framing.
MESSAGE_HEADROOM_BYTES = 1024 * 1024
# Kafka's default socket.request.max.bytes (100 MiB). The launcher only raises it.
DEFAULT_SOCKET_REQUEST_MAX_BYTES = 100 * 1024 * 1024
LOG_RETENTION_HOURS = 168

MVN_TIMEOUT_S = 900.0
STORAGE_TOOL_TIMEOUT_S = 120.0
LOG_TAIL_LINES = 30
KAFKA_OUT_ROTATE_BYTES = 10 * 1024 * 1024
READY_POLL_INTERVAL_S = 0.25
METADATA_TIMEOUT_S = 2.0
STOP_KILL_WAIT_S = 10.0

JAVA_HINT = (
    "install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)"
)
MAVEN_HINT = "install Apache Maven (Debian: apt-get install maven)"

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BIND_FAILURE = re.compile(r"failed to bind to [^\s:]*:(\d+)", re.IGNORECASE)
_JAVA_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?')


@dataclass(frozen=True)
class KafkaStatus:
    """State of the local broker as seen from its pid file and its port."""

    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path
    log_path: Path
    # None when the broker is not running or its metadata request failed.
    topic_count: int | None


class LocalKafka:
    """Single-node Kafka broker in KRaft mode under ``<home>/kafka``."""

    def __init__(self, settings: Settings) -> None:
        if settings.kafka_port == settings.kafka_controller_port:
            raise ConfigError(
                f"FAULTLINE_KAFKA_PORT and FAULTLINE_KAFKA_CONTROLLER_PORT are both "
                f"{settings.kafka_port}: give the controller listener another port"
            )
        self.settings = settings
        self.kafka_dir = settings.home_dir / "kafka"
        self.lib_dir = self.kafka_dir / "lib"
        self.data_dir = self.kafka_dir / "data"
        self.logs_dir = self.kafka_dir / "logs"
        self.log_path = self.logs_dir / "server.log"
        self.stdout_path = self.logs_dir / "kafka.out"
        self.config_path = self.kafka_dir / "server.properties"
        self.pid_path = self.kafka_dir / "kafka.pid"
        self.lock_path = self.kafka_dir / "launcher.lock"
        self.jars_marker_path = self.lib_dir / ".pom-sha256"
        self._java: str | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.settings.kafka_port}"

    # Jars

    def ensure_jars(self) -> Path:
        """Resolve the broker's jars into ``<home>/kafka/lib`` unless done before.

        The jars are reused while ``lib/.pom-sha256`` matches the pom. Raises
        DependencyError when java or mvn is missing or when mvn fails.
        """
        self._check_java()
        pom_sha256 = hashlib.sha256(POM_PATH.read_bytes()).hexdigest()
        if self._jars_match(pom_sha256):
            return self.lib_dir

        mvn = shutil.which("mvn")
        if mvn is None:
            raise DependencyError(
                f"mvn not found on PATH: {MAVEN_HINT}. Maven resolves the Kafka "
                f"broker's jars from {POM_PATH}"
            )
        # Resolve into a side folder and swap it in, so a failed or interrupted
        # run never leaves a half-filled lib/ that looks complete.
        partial_dir = self.kafka_dir / "lib.partial"
        shutil.rmtree(partial_dir, ignore_errors=True)
        partial_dir.mkdir(parents=True)
        command = [
            mvn, "-q", "-B", "-f", str(POM_PATH),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={partial_dir}",
            "-DincludeScope=runtime",
        ]  # fmt: skip
        logger.info("resolving Kafka jars with Maven from %s", POM_PATH)
        output, returncode = _run_tool(command, MVN_TIMEOUT_S, DependencyError)
        if returncode != 0:
            shutil.rmtree(partial_dir, ignore_errors=True)
            raise DependencyError(
                f"mvn failed (exit {returncode}) to resolve the Kafka jars from "
                f"{POM_PATH}. Maven needs access to Maven Central or a local "
                f"repository (~/.m2) that already holds them. Last output:\n"
                f"{_tail(output, LOG_TAIL_LINES)}"
            )
        if not any(partial_dir.glob("kafka_2.13-*.jar")):
            shutil.rmtree(partial_dir, ignore_errors=True)
            raise DependencyError(
                f"mvn exited 0 but copied no kafka_2.13 jar from {POM_PATH} "
                f"into {partial_dir}"
            )
        (partial_dir / self.jars_marker_path.name).write_text(pom_sha256 + "\n")
        shutil.rmtree(self.lib_dir, ignore_errors=True)
        partial_dir.rename(self.lib_dir)
        jar_count = len(list(self.lib_dir.glob("*.jar")))
        logger.info("resolved %d Kafka jars into %s", jar_count, self.lib_dir)
        return self.lib_dir

    def _jars_match(self, pom_sha256: str) -> bool:
        try:
            recorded = self.jars_marker_path.read_text().strip()
        except FileNotFoundError:
            return False
        return recorded == pom_sha256 and any(self.lib_dir.glob("kafka_2.13-*.jar"))

    def _check_java(self) -> str:
        """Return the path of java, checked once to be Java 17 or newer."""
        if self._java is not None:
            return self._java
        java = shutil.which("java")
        if java is None:
            raise DependencyError(
                f"java not found on PATH: {JAVA_HINT}. The local Kafka broker "
                f"runs on the JVM"
            )
        output, _ = _run_tool([java, "-version"], 30.0, DependencyError)
        match = _JAVA_VERSION.search(output)
        if match is None:
            logger.warning("could not read the Java version from %r", output[:200])
            self._java = java
            return java
        # Java 8 and older report "1.8.0_x", while 9 and newer put the major first.
        major = int(match.group(1))
        if major == 1 and match.group(2):
            major = int(match.group(2))
        if major < MIN_JAVA_VERSION:
            raise DependencyError(
                f"{java} is Java {major}, but Kafka needs Java {MIN_JAVA_VERSION} "
                f"or newer: {JAVA_HINT}, and put it first on PATH"
            )
        self._java = java
        return java

    # Start

    def start(self) -> str:
        """Start the broker unless ours is already running, and return its bootstrap.

        Writes server.properties, formats the storage on first use, starts
        ``kafka.Kafka`` in a new session and waits up to
        ``kafka_start_timeout_s`` for a metadata response. Raises BrokerError
        when a port is taken, the broker exits or the wait times out. A broker
        launched by this call is stopped before the error is raised.
        """
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            pid = self._running_pid()
            if pid is not None:
                self._wait_for_running_broker(pid)
                logger.info(
                    "Kafka broker already running: pid %d on %s", pid, self.bootstrap
                )
                return self.bootstrap

            self._check_ports_free()
            java = self._check_java()
            self.ensure_jars()
            self._write_server_properties()
            self._format_storage(java)
            self._launch(java)
        return self.bootstrap

    def _wait_for_running_broker(self, pid: int) -> None:
        """Wait for a broker left running by an earlier start, which may be starting."""
        timeout_s = self.settings.kafka_start_timeout_s
        deadline = time.monotonic() + timeout_s
        while not self._answers_metadata(self._read_cluster_id()):
            if not self._is_our_broker(pid):
                raise BrokerError(
                    f"Kafka broker pid {pid} exited before it became ready. "
                    f"See {self.log_path}"
                )
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"Kafka broker pid {pid} is running but metadata requests to "
                    f"{self.bootstrap} timed out for {timeout_s:g} s "
                    f"(FAULTLINE_KAFKA_START_TIMEOUT_S). Stop it with "
                    f"`faultline kafka stop` and see {self.log_path}"
                )
            time.sleep(READY_POLL_INTERVAL_S)

    def _check_ports_free(self) -> None:
        ports = (
            (self.settings.kafka_port, "FAULTLINE_KAFKA_PORT"),
            (self.settings.kafka_controller_port, "FAULTLINE_KAFKA_CONTROLLER_PORT"),
        )
        for port, env_var in ports:
            if not _port_free(port):
                raise BrokerError(_port_taken_message(port, env_var))

    def _write_server_properties(self) -> None:
        # Records carry headers and a key, and batches add framing, so the
        # broker accepts a little more than the largest frame.
        message_max_bytes = self.settings.max_message_bytes + MESSAGE_HEADROOM_BYTES
        socket_request_max_bytes = max(
            DEFAULT_SOCKET_REQUEST_MAX_BYTES, message_max_bytes + MESSAGE_HEADROOM_BYTES
        )
        port = self.settings.kafka_port
        controller_port = self.settings.kafka_controller_port
        protocol_map = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        properties = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": protocol_map,
            "controller.quorum.voters": f"{NODE_ID}@127.0.0.1:{controller_port}",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "message.max.bytes": str(message_max_bytes),
            "replica.fetch.max.bytes": str(message_max_bytes),
            "socket.request.max.bytes": str(socket_request_max_bytes),
            "log.retention.hours": str(LOG_RETENTION_HOURS),
        }
        lines = [
            "# Written by pipeline/launcher.py at each start; edits are overwritten.",
            *(f"{key}={_escape_property(value)}" for key, value in properties.items()),
        ]
        _write_atomically(self.config_path, "\n".join(lines) + "\n")

    def _format_storage(self, java: str) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = self._run_storage_tool(java, ["random-uuid"]).strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The quorum is static, so format takes no --standalone: Kafka 4.1
        # rejects --standalone together with controller.quorum.voters.
        self._run_storage_tool(
            java, ["format", "-t", cluster_id, "-c", str(self.config_path)]
        )
        logger.info(
            "formatted Kafka storage %s with cluster id %s", self.data_dir, cluster_id
        )

    def _run_storage_tool(self, java: str, arguments: list[str]) -> str:
        command = [
            java, *TOOL_JVM_OPTIONS, "-cp", str(self.lib_dir / "*"),
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG_PATH}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            STORAGE_TOOL_CLASS, *arguments,
        ]  # fmt: skip
        output, returncode = _run_tool(command, STORAGE_TOOL_TIMEOUT_S, BrokerError)
        if returncode != 0:
            raise BrokerError(
                f"Kafka StorageTool {arguments[0]} failed (exit {returncode}) for "
                f"{self.data_dir}:\n{_tail(output, LOG_TAIL_LINES)}"
            )
        return output

    def _launch(self, java: str) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        _rotate(self.stdout_path, KAFKA_OUT_ROTATE_BYTES)
        log_offset = _file_size(self.log_path)
        stdout_offset = _file_size(self.stdout_path)
        command = [
            java, *BROKER_JVM_OPTIONS, "-cp", str(self.lib_dir / "*"),
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG_PATH}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            KAFKA_MAIN_CLASS, str(self.config_path),
        ]  # fmt: skip
        started_at = time.monotonic()
        with self.stdout_path.open("ab") as stdout:
            # A new session keeps the broker alive when the caller's terminal
            # or process group gets SIGINT or SIGHUP.
            process = subprocess.Popen(
                command,
                cwd=self.kafka_dir,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _write_atomically(self.pid_path, f"{process.pid}\n")
        logger.info(
            "launched Kafka broker pid %d for %s, log %s",
            process.pid,
            self.bootstrap,
            self.log_path,
        )
        try:
            self._wait_until_ready(process, started_at, log_offset, stdout_offset)
        except BrokerError:
            if process.poll() is None:
                self._signal_and_wait(process.pid, timeout_s=STOP_KILL_WAIT_S)
            self.pid_path.unlink(missing_ok=True)
            raise
        logger.info(
            "Kafka broker pid %d ready on %s after %.1f s",
            process.pid,
            self.bootstrap,
            time.monotonic() - started_at,
        )

    def _wait_until_ready(
        self,
        process: subprocess.Popen[bytes],
        started_at: float,
        log_offset: int,
        stdout_offset: int,
    ) -> None:
        timeout_s = self.settings.kafka_start_timeout_s
        cluster_id = self._read_cluster_id()
        while not self._answers_metadata(cluster_id):
            returncode = process.poll()
            if returncode is not None:
                problem = f"exited with code {returncode} during start"
            elif time.monotonic() - started_at >= timeout_s:
                problem = (
                    f"timed out: no metadata response on {self.bootstrap} within "
                    f"{timeout_s:g} s (FAULTLINE_KAFKA_START_TIMEOUT_S), so it was "
                    f"stopped"
                )
            else:
                time.sleep(READY_POLL_INTERVAL_S)
                continue
            log_text = _read_from(self.log_path, log_offset)
            stdout_text = _read_from(self.stdout_path, stdout_offset)
            raise BrokerError(
                self._start_failure_message(process.pid, problem, log_text, stdout_text)
            )

    def _start_failure_message(
        self, pid: int, problem: str, log_text: str, stdout_text: str
    ) -> str:
        bind_failure = _BIND_FAILURE.search(log_text + stdout_text)
        if bind_failure is not None:
            port = int(bind_failure.group(1))
            env_var = (
                "FAULTLINE_KAFKA_CONTROLLER_PORT"
                if port == self.settings.kafka_controller_port
                else "FAULTLINE_KAFKA_PORT"
            )
            problem = f"{problem}. {_port_taken_message(port, env_var)}"
        # server.log has the whole story at INFO. kafka.out matters only when
        # the JVM failed before Log4j started, for example on a bad option.
        if log_text.strip():
            path, text = self.log_path, log_text
        else:
            path, text = self.stdout_path, stdout_text
        summary = (
            f"Kafka broker pid {pid} {problem}. Broker log: {self.log_path}, "
            f"JVM output: {self.stdout_path}."
        )
        if not text.strip():
            return f"{summary} Neither file has new lines."
        return f"{summary}\nLast lines of {path}:\n{_tail(text, LOG_TAIL_LINES)}"

    # Stop and status

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker named by the pid file: SIGTERM, then SIGKILL after timeout_s.

        Returns False when no broker of ours was running. A pid file that
        names another process is removed and that process is left alone.
        """
        if not self.kafka_dir.is_dir():
            return False
        with self._lock():
            pid = self._running_pid()
            if pid is None:
                return False
            logger.info("stopping Kafka broker pid %d", pid)
            self._signal_and_wait(pid, timeout_s)
            self.pid_path.unlink(missing_ok=True)
            logger.info("stopped Kafka broker pid %d", pid)
            return True

    def _signal_and_wait(self, pid: int, timeout_s: float) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if _wait_for_exit(pid, timeout_s):
            return
        logger.warning(
            "Kafka broker pid %d did not exit %.0f s after SIGTERM, sending SIGKILL",
            pid,
            timeout_s,
        )
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if not _wait_for_exit(pid, STOP_KILL_WAIT_S):
            raise BrokerError(f"Kafka broker pid {pid} is still alive after SIGKILL")

    def status(self) -> KafkaStatus:
        """Return whether our broker runs and, when it responds, its topic count.

        A pid file that names another process is removed, as in ``stop``.
        """
        pid = self._running_pid()
        topic_count = self._topic_count() if pid is not None else None
        return KafkaStatus(
            running=pid is not None,
            pid=pid,
            bootstrap=self.bootstrap,
            data_dir=self.data_dir,
            log_path=self.log_path,
            topic_count=topic_count,
        )

    # Pid file, process identity and metadata

    def _running_pid(self) -> int | None:
        """Return the pid of our live broker, removing a pid file that names another."""
        try:
            text = self.pid_path.read_text().strip()
        except FileNotFoundError:
            return None
        pid = int(text) if text.isdigit() else None
        if pid is not None and self._is_our_broker(pid):
            return pid
        logger.warning(
            "removing stale pid file %s: %r is not a running Kafka broker of %s",
            self.pid_path,
            text,
            self.config_path,
        )
        self.pid_path.unlink(missing_ok=True)
        return None

    def _is_our_broker(self, pid: int) -> bool:
        arguments = _process_arguments(pid)
        return (
            arguments is not None
            and KAFKA_MAIN_CLASS in arguments
            and str(self.config_path) in arguments
        )

    def _read_cluster_id(self) -> str | None:
        try:
            text = (self.data_dir / "meta.properties").read_text()
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id":
                return value.strip()
        return None

    def _answers_metadata(self, cluster_id: str | None) -> bool:
        """Return True when our port returns metadata of NODE_ID in cluster_id."""
        # A plain TCP probe first keeps librdkafka from logging refused
        # connections while the JVM starts.
        if _port_free(self.settings.kafka_port):
            return False
        metadata = self._list_topics()
        if metadata is None:
            return False
        return metadata.cluster_id == cluster_id and NODE_ID in metadata.brokers

    def _topic_count(self) -> int | None:
        metadata = self._list_topics()
        return None if metadata is None else len(metadata.topics)

    def _list_topics(self) -> ClusterMetadata | None:
        # librdkafka's own log lines go to a child logger, and only when polled.
        admin = AdminClient(
            {"bootstrap.servers": self.bootstrap},
            logger=logging.getLogger(f"{__name__}.librdkafka"),
        )
        try:
            return admin.list_topics(timeout=METADATA_TIMEOUT_S)
        except KafkaException as error:
            logger.debug("metadata request to %s failed: %s", self.bootstrap, error)
            return None

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise start and stop across processes that share this home."""
        with self.lock_path.open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _port_free(port: int) -> bool:
    """Return True when nothing listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as the JVM sets it, so TIME_WAIT sockets left by an
        # earlier broker do not count as taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_taken_message(port: int, env_var: str) -> str:
    return (
        f"Port 127.0.0.1:{port} is already in use by another process: set {env_var} "
        f"to a free port, or stop the program that listens on {port}"
    )


def _process_arguments(pid: int) -> list[str] | None:
    """Return the command line of a live, non-zombie process, or None."""
    proc_dir = Path("/proc") / str(pid)
    if Path("/proc/self").exists():
        try:
            # Field 3 of /proc/<pid>/stat is the state, and Z means a zombie.
            # The JVM's main thread can exit first and show Z while other
            # threads still run, so a zombie counts as dead only when it has
            # no thread left but itself.
            stat = (proc_dir / "stat").read_text()
            state = stat.rpartition(")")[2].split()[0]
            if state == "Z" and len(os.listdir(proc_dir / "task")) <= 1:
                return None
            raw = (proc_dir / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    # Without /proc (macOS) ps shows the command line joined by spaces.
    # NOTE: this branch is not run by the tests, which run on Linux.
    result = subprocess.run(
        ["ps", "-ww", "-o", "state=,command=", "-p", str(pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    state, _, command = result.stdout.strip().partition(" ")
    if result.returncode != 0 or not command or state.startswith("Z"):
        return None
    return command.split()


def _wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Wait until pid has exited, reaping it when it is our child."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            # For our own child, waitpid reports the exit of the whole process
            # and reaps it, so no zombie is left behind.
            reaped_pid, _ = os.waitpid(pid, os.WNOHANG)
            if reaped_pid == pid:
                return True
        except ChildProcessError:
            # Not our child: its own parent or init reaps it.
            if _process_arguments(pid) is None:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _run_tool(
    command: list[str], timeout_s: float, error_type: type[Exception]
) -> tuple[str, int]:
    """Run command and return its stdout and stderr together, and its exit code.

    Raises error_type when the command runs longer than timeout_s.
    """
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        output = (error.output or b"").decode(errors="replace")
        raise error_type(
            f"{Path(command[0]).name} timed out after {timeout_s:g} s: "
            f"{' '.join(command)}\n{_tail(output, LOG_TAIL_LINES)}"
        ) from error
    output = _ANSI_ESCAPE.sub("", result.stdout.decode(errors="replace"))
    return output, result.returncode


def _escape_property(value: str) -> str:
    # Java properties treat a backslash as an escape character.
    return value.replace("\\", "\\\\")


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    """Return the text appended to path after offset, or all of it if it rolled over."""
    try:
        with path.open("rb") as file:
            if file.seek(0, os.SEEK_END) < offset:
                offset = 0
            file.seek(offset)
            return file.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _rotate(path: Path, max_bytes: int) -> None:
    if _file_size(path) > max_bytes:
        os.replace(path, path.with_name(path.name + ".1"))


def _tail(text: str, line_count: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-line_count:])
