"""Faultline core: settings, topic names, Kafka helpers, the local broker
launcher, the ClickHouse store and sink, and the ``faultline`` command."""

from pipeline.errors import FaultlineError
from pipeline.settings import Settings

__all__ = ["FaultlineError", "Settings"]
