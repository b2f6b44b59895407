"""Logging helpers shared by the long-running processes."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter


class RepeatFilter(logging.Filter):
    """Let one record per key through per interval and count the dropped ones.

    The key is the first ``key_words`` words of the message. Records below
    ``min_level`` always pass.
    """

    def __init__(
        self, interval_s: float, key_words: int = 1, min_level: int = logging.NOTSET
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.key_words = key_words
        self.min_level = min_level
        self._shown_at: dict[str, float] = {}
        self._dropped: Counter[str] = Counter()
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return True
        key = " ".join(record.getMessage().split(" ", self.key_words)[: self.key_words])
        now = time.monotonic()
        with self._lock:
            if now - self._shown_at.get(key, -self.interval_s) < self.interval_s:
                self._dropped[key] += 1
                return False
            self._shown_at[key] = now
            dropped = self._dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} similar messages dropped)"
            record.args = None
        return True
