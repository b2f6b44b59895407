"""Kafka client configuration and topic administration, in one place.

Every librdkafka dictionary of the project is built here, so that the size
limits agree: a frame up to ``max_message_bytes`` fits the producer request,
the topic and the consumer fetch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.errors import BrokerError
from pipeline.logs import RepeatFilter
from pipeline.settings import Settings
from pipeline.topics import DEADLETTER_TOPIC, frames_topic, results_topic

log = logging.getLogger(__name__)

# librdkafka's own log lines (broker connects, retries) go through logging
# instead of straight to stderr.
LIBRDKAFKA_LOGGER = logging.getLogger("librdkafka")
# While a broker is down librdkafka repeats each failure several times a
# second; one line per kind a minute, with the count, is enough.
LIBRDKAFKA_LOGGER.addFilter(RepeatFilter(60.0))

# Record batch, headers and protocol framing around one frame's bytes.
MESSAGE_OVERHEAD_BYTES = 64 * 1024


def topic_max_bytes(settings: Settings) -> int:
    """``max.message.bytes`` of frame and dead-letter topics."""
    return settings.max_message_bytes + MESSAGE_OVERHEAD_BYTES


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Idempotent producer that waits for all in-sync replicas."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "acks": "all",
        "enable.idempotence": True,
        "message.max.bytes": topic_max_bytes(settings),
        "compression.type": "none",  # JPEG and PNG are compressed already
        "linger.ms": 5,
        "delivery.timeout.ms": 30000,
        "topic.metadata.refresh.interval.ms": int(settings.metadata_max_age_s * 1000),
        "logger": LIBRDKAFKA_LOGGER,
    }
    config.update(overrides)
    return config


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Consumer that commits only on request, from the earliest offset."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.max.bytes": max(topic_max_bytes(settings) * 2, 52428800),
        "max.partition.fetch.bytes": topic_max_bytes(settings),
        "topic.metadata.refresh.interval.ms": int(settings.metadata_max_age_s * 1000),
        "session.timeout.ms": 30000,
        "max.poll.interval.ms": 300000,
        "logger": LIBRDKAFKA_LOGGER,
    }
    config.update(overrides)
    return config


def admin_config(settings: Settings) -> dict[str, Any]:
    return {"bootstrap.servers": settings.bootstrap_servers, "logger": LIBRDKAFKA_LOGGER}


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def line_topic_specs(settings: Settings, line: str) -> list[TopicSpec]:
    """Return the frames, results and dead-letter topic specs of one line."""
    limit = str(topic_max_bytes(settings))
    # CreateTime: the Kafka timestamp is the capture time, so replay by time
    # range can use offsets_for_times.
    frame_config = {"max.message.bytes": limit, "message.timestamp.type": "CreateTime"}
    return [
        TopicSpec(frames_topic(line), settings.frame_partitions, frame_config),
        TopicSpec(results_topic(line), settings.result_partitions, {"max.message.bytes": "1048576"}),
        TopicSpec(DEADLETTER_TOPIC, settings.deadletter_partitions, {"max.message.bytes": limit}),
    ]


def create_topics(settings: Settings, specs: list[TopicSpec], timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(admin_config(settings))
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise BrokerError(
            f"Kafka at {settings.bootstrap_servers} did not respond: {exc}; start it "
            "with `faultline kafka start` or set FAULTLINE_BOOTSTRAP_SERVERS"
        ) from exc
    wanted = {}
    for spec in specs:
        if spec.name not in existing and spec.name not in wanted:
            wanted[spec.name] = NewTopic(
                spec.name,
                num_partitions=spec.partitions,
                replication_factor=settings.replication_factor,
                config=spec.config,
            )
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(list(wanted.values()), request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
            log.info("created topic %s", name)
        except KafkaException as exc:
            if exc.args[0].name() == "TOPIC_ALREADY_EXISTS":
                continue
            raise BrokerError(f"creating topic {name!r} failed: {exc}") from exc
    return created


def ensure_line_topics(settings: Settings, line: str) -> list[str]:
    return create_topics(settings, line_topic_specs(settings, line))


def list_lines(settings: Settings, timeout_s: float = 10.0) -> list[str]:
    """Line ids that have a frames topic on the broker."""
    from confluent_kafka.admin import AdminClient

    from pipeline.topics import FRAMES_PREFIX

    from confluent_kafka import KafkaException

    admin = AdminClient(admin_config(settings))
    try:
        topics = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise BrokerError(
            f"Kafka at {settings.bootstrap_servers} did not respond: {exc}; start it "
            "with `faultline kafka start` or set FAULTLINE_BOOTSTRAP_SERVERS"
        ) from exc
    return sorted(t[len(FRAMES_PREFIX) :] for t in topics if t.startswith(FRAMES_PREFIX))
