"""Structured logging: one line per event, ``key=value`` (default) or JSON, to stderr (journald).

``log(logger, "event.name", key=value, ...)``; per-frame events go at DEBUG only.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["setup_logging", "log", "get_logger"]


def _kv_value(value) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, role: str):
        super().__init__()
        self.fmt, self.role = fmt, role

    def format(self, record: logging.LogRecord) -> str:
        fields = {
            "ts": f"{record.created:.3f}",
            "level": record.levelname.lower(),
            "proc": self.role,
            "event": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}))
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        if self.fmt == "json":
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={_kv_value(v)}" for k, v in fields.items())


def setup_logging(role: str, fmt: str = "kv", level: str = "INFO") -> logging.Logger:
    logger = logging.getLogger("edge_daemon")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt, role))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    logging.Formatter.converter = time.gmtime
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger("edge_daemon")


def log(logger: logging.Logger, event: str, level: int = logging.INFO, exc_info=None, **fields) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)
