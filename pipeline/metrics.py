"""Prometheus metrics of the results edge, built on a registry passed in.

Every app gets its own registry, so several apps in one process (tests) do
not collide. Labels are bounded: ``line`` is a validated line id and
``query`` one of the fixed query names the edge times. No label carries a
frame or camera id.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a cached chDB aggregate (about a millisecond) up to a scan of
# a month of a busy line on a ClickHouse server.
QUERY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class EdgeMetrics:
    """Counters, gauges and histograms of one results edge."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.clients = Gauge(
            "faultline_edge_ws_clients",
            "WebSocket clients connected to the live results feed.",
            registry=registry,
        )
        self.queued = Gauge(
            "faultline_edge_ws_queued_messages",
            "Messages waiting in the queues of all WebSocket clients.",
            registry=registry,
        )
        self.sent = Counter(
            "faultline_edge_ws_messages_sent",
            "Results sent to WebSocket clients, live and backfill.",
            ["line"],
            registry=registry,
        )
        self.dropped = Counter(
            "faultline_edge_ws_messages_dropped",
            "Results dropped from a full client queue (the oldest goes first).",
            ["line"],
            registry=registry,
        )
        self.consumed = Counter(
            "faultline_edge_results_consumed",
            "Result records read from results.<line> by the live feed.",
            ["line"],
            registry=registry,
        )
        self.rejected = Counter(
            "faultline_edge_results_rejected",
            "Records on results.* that are not valid result JSON; never sent.",
            registry=registry,
        )
        self.query_seconds = Histogram(
            "faultline_edge_query_seconds",
            "Latency of store queries and frame fetches, in seconds.",
            ["query"],
            buckets=QUERY_BUCKETS_S,
            registry=registry,
        )

    def watch_queued(self, total: Callable[[], int]) -> None:
        """Read the queued-messages gauge from ``total`` at every scrape."""
        self.queued.set_function(total)
