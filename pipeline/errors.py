"""Exception tree shared by every Faultline package.

    FaultlineError
     +-- ConfigError          a setting or argument is invalid; the message names it
     +-- DependencyError      java, mvn or an optional Python extra is missing
     +-- BrokerError          Kafka did not respond or rejected a request
     +-- StoreError           ClickHouse rejected a query or an insert
     +-- FrameError           one frame cannot be processed; carries its position
          +-- DecodeError     the bytes are not a decodable image
          +-- InferenceError  the model failed on the frame's batch
"""

from __future__ import annotations


class FaultlineError(Exception):
    """Root of every error raised on purpose by Faultline."""


class ConfigError(FaultlineError):
    """A setting, argument or file is invalid; the message names the fix."""


class DependencyError(FaultlineError):
    """A program or an optional package that this command needs is missing."""


class BrokerError(FaultlineError):
    """Kafka could not be reached or rejected a request."""


class StoreError(FaultlineError):
    """ClickHouse rejected a statement or could not be reached."""


class FrameError(FaultlineError):
    """One frame failed; the position lets the dead-letter path record it."""

    reason = "frame-error"
    stage = "unknown"

    def __init__(
        self,
        message: str,
        *,
        topic: str = "",
        partition: int = -1,
        offset: int = -1,
    ) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset


class DecodeError(FrameError):
    reason = "decode-failed"
    stage = "decode"


class InferenceError(FrameError):
    reason = "inference-failed"
    stage = "inference"
