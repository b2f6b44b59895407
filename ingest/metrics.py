"""Prometheus metrics of the ingest edge, built on a registry passed in.

Times are in seconds and sizes in bytes. The only labels are the line id and,
for rejections, a reason from a fixed set of error codes. The line label
carries a line id only once its frames topic is known to exist. Requests for
other line ids count under ``unknown``, so a client cannot grow the label set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UNKNOWN_LINE = "unknown"

# From a 1 ms local ack to the 10 s default of ingest_ack_timeout_s.
PRODUCE_SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class EdgeMetrics:
    """Counters, gauges and histograms of one ingest edge process."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Frames and bytes
        self.frames_accepted = Counter(
            "faultline_ingest_frames_accepted",
            "Frames acknowledged by the broker, which got a 202 reply or an ack.",
            ["line"],
            registry=registry,
        )
        self.bytes_accepted = Counter(
            "faultline_ingest_accepted_bytes",
            "Image bytes of the accepted frames.",
            ["line"],
            registry=registry,
        )
        self.frames_rejected = Counter(
            "faultline_ingest_frames_rejected",
            "Frames or requests rejected, by error code of the reply.",
            ["line", "reason"],
            registry=registry,
        )

        # Producer and broker
        self.produce_seconds = Histogram(
            "faultline_ingest_produce_seconds",
            "Time from the produce call to the broker's delivery report.",
            ["line"],
            buckets=PRODUCE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.frames_in_flight = Gauge(
            "faultline_ingest_frames_in_flight",
            "Frames produced and still waiting for the broker's delivery report.",
            ["line"],
            registry=registry,
        )
        self.broker_reachable = Gauge(
            "faultline_ingest_broker_reachable",
            "1 while the edge's producer reaches the broker, else 0.",
            registry=registry,
        )

        # WebSocket streams
        self.ws_connections = Gauge(
            "faultline_ingest_ws_connections",
            "Open WebSocket streams.",
            ["line"],
            registry=registry,
        )
        self.ws_credit_exceeded = Counter(
            "faultline_ingest_ws_credit_exceeded",
            "Frames a WebSocket client sent beyond its credit; each was held "
            "until a slot freed.",
            ["line"],
            registry=registry,
        )

        # Chunked uploads
        self.uploads_open = Gauge(
            "faultline_ingest_uploads_open",
            "Chunked uploads started and not yet completed, aborted or expired.",
            registry=registry,
        )
        self.uploads_reserved_bytes = Gauge(
            "faultline_ingest_uploads_reserved_bytes",
            "Sum of the declared sizes of the open uploads.",
            registry=registry,
        )
        self.uploads_expired = Counter(
            "faultline_ingest_uploads_expired",
            "Uploads deleted because no chunk arrived within ingest_upload_ttl_s.",
            registry=registry,
        )
