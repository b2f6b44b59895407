"""Topic names, line id rules and the one way a record position is written.

A position reads ``frames.line-3[2]@1041``: topic, partition in brackets,
offset after ``@``. Logs, errors and dead-letter messages all use it.
"""

from __future__ import annotations

import re

from pipeline.errors import ConfigError

FRAMES_PREFIX = "frames."
RESULTS_PREFIX = "results."
DEADLETTER_TOPIC = "deadletter.frames"
MAX_LINE_ID_LENGTH = 64

_LINE_ID = re.compile(r"^[a-z0-9_-]+$")
# Regular expressions for pattern subscriptions; librdkafka and aiokafka both
# treat a leading ``^`` as "this is a pattern".
FRAMES_PATTERN = r"^frames\.[a-z0-9_-]+$"
RESULTS_PATTERN = r"^results\.[a-z0-9_-]+$"


def topic_pattern(prefix: str, lines: tuple[str, ...] = ()) -> str:
    """Subscription pattern for ``prefix`` topics of ``lines`` (all when empty)."""
    if not lines:
        return FRAMES_PATTERN if prefix == FRAMES_PREFIX else RESULTS_PATTERN
    names = "|".join(re.escape(validate_line_id(line)) for line in lines)
    return f"^{re.escape(prefix)}({names})$"


def validate_line_id(line: str) -> str:
    """Return ``line`` unchanged, or raise ConfigError naming the rule it breaks."""
    if not isinstance(line, str) or not line:
        raise ConfigError("line id is empty: use lowercase letters, digits, '-' or '_'")
    if len(line) > MAX_LINE_ID_LENGTH:
        raise ConfigError(
            f"line id {line[:80]!r} has {len(line)} characters; "
            f"the maximum is {MAX_LINE_ID_LENGTH}"
        )
    if not _LINE_ID.match(line):
        raise ConfigError(
            f"line id {line!r} is invalid: use only lowercase letters, digits, "
            "'-' and '_' (for example 'line-3')"
        )
    return line


def frames_topic(line: str) -> str:
    return FRAMES_PREFIX + validate_line_id(line)


def results_topic(line: str) -> str:
    return RESULTS_PREFIX + validate_line_id(line)


def line_of_topic(topic: str) -> str:
    """Return the line id of a ``frames.<line>`` or ``results.<line>`` topic."""
    for prefix in (FRAMES_PREFIX, RESULTS_PREFIX):
        if topic.startswith(prefix):
            return validate_line_id(topic[len(prefix) :])
    raise ConfigError(
        f"topic {topic!r} is not a per-line topic "
        f"(expected {FRAMES_PREFIX}<line> or {RESULTS_PREFIX}<line>)"
    )


def format_position(topic: str, partition: int, offset: int) -> str:
    return f"{topic}[{partition}]@{offset}"
