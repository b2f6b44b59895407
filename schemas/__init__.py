"""The wire contract: frame headers, result records and dead-letter records.

Imports nothing heavier than the standard library, so edges and tools can
use it without torch, ultralytics or chdb.
"""

from schemas.records import (
    SCHEMA_VERSION,
    DeadLetter,
    Detection,
    FrameHeaders,
    HeaderError,
    ResultRecord,
    StageLatency,
)

__all__ = [
    "SCHEMA_VERSION",
    "DeadLetter",
    "Detection",
    "FrameHeaders",
    "HeaderError",
    "ResultRecord",
    "StageLatency",
]
