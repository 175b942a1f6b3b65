"""Structured logs: one JSON object per line on stdout for cluster logging, and a rate limit for errors."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

import structlog

LOG_BURST = 10  # error lines per event and window before they are only counted


def _level_filter(level: str) -> type[Any]:
    # A filtering bound logger makes the calls of filtered levels no-ops that cost nothing.
    return structlog.make_filtering_bound_logger(getattr(logging, level.upper()))


def configure_logging(level: str, stream: TextIO | None = None) -> Any:
    """JSON logs, one object per line (stdout by default), ISO UTC timestamps; the logger to use.

    Loggers are not cached on first use, so set_log_level() takes effect on every logger handed
    out, and structlog.testing.capture_logs() works in tests.
    """
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=_level_filter(level),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger()


def set_log_level(level: str) -> None:
    """Change the level of every logger while the process runs (a reloaded --log-level)."""
    structlog.configure(wrapper_class=_level_filter(level))


class RateLimitedLog:
    """Error lines limited to LOG_BURST per event and window; the rest are counted and reported once."""

    def __init__(self, log: Any, window: float = 10.0) -> None:
        self.log = log
        self.window = window
        self.windows: dict[str, tuple[float, int]] = {}

    def error(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        start, count = self.windows.get(event, (now, 0))
        if now - start > self.window:
            if count > LOG_BURST:
                self.log.warning("log_lines_suppressed", suppressed_event=event, count=count - LOG_BURST)
            start, count = now, 0
        count += 1
        self.windows[event] = (start, count)
        if count <= LOG_BURST:
            self.log.error(event, **fields)
