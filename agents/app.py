"""The Faust app of the inference workers.

Commit design: the agent takes up to ``max_batch_frames`` events (or what
arrived within ``batch_timeout_s``), turns them into results or dead letters,
sends every record and waits until the broker acknowledged each one. Only
then does the loop ask for the next batch, which is when Faust acks the
previous batch's events; Faust commits acked offsets only. A crash before
that point redelivers the batch (at least once), and the results table
collapses the duplicates by frame id.

Stopping the worker cancels the agent. The batch in flight is shielded from
that cancellation and finished first, so its events are never acked before
their records were sent.

Concurrency stays 1: faust-streaming with concurrency > 1 commits past
events that another instance of the agent still processes.

New lines: faust-streaming 0.15 cannot subscribe to a topic pattern (its
aiokafka driver passes only topic names), so a timer lists the broker's
``frames.<line>`` topics every ``metadata_max_age_s`` seconds and adds new
ones to the agent's topic. The consumer then resubscribes and rebalances
onto the new line without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import faust
from confluent_kafka.admin import AdminClient

from agents.batch import BatchProcessor, FrameMessage, InferenceThread, Outcome, headers_of
from models.registry import Registry, load_detector
from pipeline.errors import BrokerError
from pipeline.kafka import admin_config, ensure_line_topics, topic_max_bytes
from pipeline.logs import RepeatFilter
from pipeline.settings import Settings
from pipeline.topics import DEADLETTER_TOPIC, FRAMES_PREFIX, results_topic, topic_pattern

log = logging.getLogger(__name__)

SEND_RETRY_S = 2.0
# aiokafka logs each failed reconnect while the broker is down. One line per
# kind of message a minute is kept, with the count of the dropped ones.
logging.getLogger("aiokafka").addFilter(RepeatFilter(60.0, key_words=4))
# Faust waits this long before it resubscribes after a topic change, so that
# several changes share one rebalance; its default is 45 s.
RESUBSCRIBE_DELAY_S = 1.0


def frame_topics(settings: Settings, timeout_s: float = 10.0) -> list[str]:
    """Names of the ``frames.<line>`` topics on the broker."""
    from confluent_kafka import KafkaException

    try:
        metadata = AdminClient(admin_config(settings)).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerError(
            f"Kafka at {settings.bootstrap_servers} did not respond: {exc}"
        ) from exc
    wanted = re.compile(topic_pattern(FRAMES_PREFIX, settings.line_ids))
    return sorted(name for name in metadata.topics if wanted.match(name))


class ResultPublisher:
    """Sends outcomes and waits for the broker's acknowledgement of each."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._topics: dict[str, faust.TopicT] = {}
        self._deadletters = app.topic(DEADLETTER_TOPIC, key_type=bytes, value_type=bytes)

    async def _results_topic(self, line: str) -> faust.TopicT:
        topic = self._topics.get(line)
        if topic is None:
            # The CLI creates all three topics of a line; a frames topic made
            # by other means gets its results topic here.
            await asyncio.to_thread(ensure_line_topics, self.settings, line)
            topic = self.app.topic(results_topic(line), key_type=bytes, value_type=bytes)
            self._topics[line] = topic
        return topic

    async def _send_all(self, outcomes: list[Outcome]) -> None:
        futures = []
        for outcome in outcomes:
            message = outcome.message
            if outcome.result is not None:
                record = outcome.result
                topic = await self._results_topic(record.line_id)
                futures.append(
                    await topic.send(
                        key=record.camera_id.encode(),
                        value=record.to_json(),
                        timestamp=record.captured_at_ns / 1e9,
                        headers=[("frame-id", record.frame_id.encode()), ("schema-version", b"1")],
                    )
                )
            else:
                assert outcome.deadletter is not None
                futures.append(
                    await self._deadletters.send(
                        key=message.key,
                        value=message.value or b"",
                        headers=outcome.deadletter.attach(message.headers),
                    )
                )
        await asyncio.gather(*futures)

    async def publish(self, outcomes: list[Outcome]) -> None:
        """Send until every record is acknowledged; retries forever on errors."""
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._send_all(outcomes)
                return
            except Exception as exc:  # broker away, timeouts: keep the batch
                log.warning(
                    "sending %d records failed (attempt %d): %s; retrying in %.0f s",
                    len(outcomes), attempt, exc, SEND_RETRY_S,
                )
                await asyncio.sleep(SEND_RETRY_S)


def create_app(settings: Settings, topics: list[str]) -> faust.App:
    """Build the worker app consuming ``topics`` plus any line added later."""
    if not topics:
        raise BrokerError("the worker needs at least one frames.<line> topic to start")
    spec = Registry(settings.model_registry).get(settings.model)
    app = faust.App(
        settings.worker_app_id,
        broker=f"kafka://{settings.bootstrap_servers.replace(',', ';')}",
        key_serializer="raw",
        value_serializer="raw",
        datadir=str(settings.home_dir / "faust"),
        topic_disable_leader=True,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        consumer_metadata_max_age_ms=int(settings.metadata_max_age_s * 1000),
        producer_metadata_max_age_ms=int(settings.metadata_max_age_s * 1000),
        consumer_max_fetch_size=topic_max_bytes(settings),
        producer_max_request_size=topic_max_bytes(settings),
        producer_acks=-1,
        broker_commit_interval=1.0,
        broker_max_poll_interval=600.0,
        # A killed worker's partitions move to the others after this long.
        broker_session_timeout=15.0,
        broker_heartbeat_interval=3.0,
        stream_buffer_maxsize=max(4 * settings.max_batch_frames, 64),
        web_enabled=True,
        web_host="127.0.0.1",
        web_bind="127.0.0.1",
        web_port=settings.worker_web_port,
    )
    frames = app.topic(*topics, key_type=bytes, value_type=bytes)
    # NOTE: the line discovery below uses private attributes of
    # faust-streaming 0.15's Conductor (_topics, _flag_changes).
    app.topics._resubscribe_sleep_lock_seconds = RESUBSCRIBE_DELAY_S
    inference = InferenceThread(lambda: load_detector(spec, settings.device))
    # Load before consuming: a model that cannot load stops the worker here
    # instead of dead-lettering every frame it would take.
    detector = inference.preload()
    log.info("model %s %s ready on %s", spec.name, spec.version, detector.device)
    processor = BatchProcessor(spec, inference, settings.decode_threads)
    publisher = ResultPublisher(app, settings)


    @app.timer(interval=settings.metadata_max_age_s)
    async def discover_lines() -> None:
        try:
            names = await asyncio.to_thread(frame_topics, settings)
        except BrokerError as exc:
            log.warning("listing frames topics failed: %s", exc)
            return
        new = sorted(set(names) - set(frames.topics))
        if new:
            log.info("new line topics %s: subscribing", ", ".join(new))
            frames.topics = [*frames.topics, *new]
            # Agents subscribe through clones of the topic, so the clones in the
            # conductor get the new names too.
            for channel in list(app.topics._topics):
                names = getattr(channel, "topics", None) or ()
                if any(name.startswith(FRAMES_PREFIX) for name in names):
                    channel.topics = [*names, *(n for n in new if n not in names)]
            app.topics._flag_changes()

    async def handle(events: list[Any]) -> None:
        messages = [
            FrameMessage(
                topic=event.message.topic,
                partition=event.message.partition,
                offset=event.message.offset,
                key=event.message.key,
                value=event.message.value,
                headers=headers_of(event.message.headers),
            )
            for event in events
        ]
        outcomes = await processor.process(messages)
        await publisher.publish(outcomes)
        failed = sum(1 for o in outcomes if o.deadletter is not None)
        log.debug("batch of %d frames done, %d dead-lettered", len(outcomes), failed)

    @app.agent(frames, concurrency=1)
    async def inspect(stream: faust.StreamT) -> None:
        async for events in stream.take_events(
            settings.max_batch_frames, within=settings.batch_timeout_s
        ):
            job = asyncio.ensure_future(handle(list(events)))
            cancelled = False
            while not job.done():
                try:
                    await asyncio.shield(job)
                except asyncio.CancelledError:
                    if not cancelled:
                        log.info("worker stopping: finishing the batch in flight first")
                    cancelled = True
            job.result()
            if cancelled:
                raise asyncio.CancelledError

    return app
