"""One log stream: Wharf's lines and the HTTP server's own, in the configured format, with `log.fields`."""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

from .config import LogConfig

_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


def _name(record: logging.LogRecord) -> str:
    """Logger names as operators should read them: granian's Rust core logs as `_granian...`."""
    return record.name[1:] if record.name.startswith("_granian") else record.name


class _Formatter(logging.Formatter):
    """The parts every format shares: the time in UTC, the static fields, the record's own fields."""

    def __init__(self, fields: dict[str, object] | None = None) -> None:
        super().__init__()
        self.fields = dict(fields or {})

    def timestamp(self, record: logging.LogRecord) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"

    def entry(self, record: logging.LogRecord) -> dict[str, Any]:
        entry: dict[str, Any] = dict(self.fields)
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return entry


class JSONFormatter(_Formatter):
    """One JSON object per line: time, level, logger, msg, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        head: dict[str, Any] = {
            "time": self.timestamp(record),
            "level": record.levelname.lower(),
            "logger": _name(record),
            "msg": record.getMessage(),
        }
        return json.dumps({**head, **self.entry(record)}, default=str)


class LogstashFormatter(_Formatter):
    """What Distribution's `formatter: logstash` writes: JSON with @timestamp, @version and message."""

    def format(self, record: logging.LogRecord) -> str:
        head: dict[str, Any] = {
            "@timestamp": self.timestamp(record),
            "@version": "1",
            "level": record.levelname.lower(),
            "logger": _name(record),
            "message": record.getMessage(),
        }
        return json.dumps({**head, **self.entry(record)}, default=str)


def _text_value(value: object) -> str:
    """A value as logrus writes it: bare when it is letters, digits and -._/@^+, quoted otherwise."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if all(c.isascii() and (c.isalnum() or c in "-._/@^+") for c in text):
        return text
    return json.dumps(text)


class TextFormatter(_Formatter):
    """Distribution's default `formatter: text` (logrus): time="..." level=info msg="..." then the
    fields sorted by name, as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"time={_text_value(self.timestamp(record))}",
            f"level={record.levelname.lower()}",
            f"msg={_text_value(record.getMessage())}",
            f"logger={_name(record)}",
        ]
        parts += [f"{key}={_text_value(value)}" for key, value in sorted(self.entry(record).items())]
        return " ".join(parts)


_FORMATTERS: dict[str, type[_Formatter]] = {"json": JSONFormatter, "text": TextFormatter, "logstash": LogstashFormatter}


def formatter_for(log: LogConfig) -> logging.Formatter:
    return _FORMATTERS[log.formatter](log.fields)


def configure_logging(log: LogConfig | str = "info") -> logging.handlers.QueueListener:
    """Route every log record through a queue to a thread that writes formatted lines to stdout.

    Uncaught exceptions and Python warnings become log lines too, so nothing bypasses the format.
    """
    if isinstance(log, str):
        log = LogConfig(level=log)
    global _formatter
    _formatter = formatter_for(log)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_formatter)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler)
    root = logging.getLogger()
    root.handlers = [logging.handlers.QueueHandler(records)]
    root.setLevel(_LEVELS.get(log.level, logging.INFO))
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    listener.start()
    return listener


_formatter: logging.Formatter = JSONFormatter()


def _log_uncaught(kind: type[BaseException], error: BaseException, trace: Any) -> None:
    """A crash as one line in the configured format, written at once (the log thread may be gone)."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    record = logging.LogRecord("wharf", logging.CRITICAL, __file__, 0, "uncaught exception", (), (kind, error, trace))
    print(_formatter.format(record), file=sys.stderr, flush=True)


def granian_log_config() -> dict[str, Any]:
    """granian's `log_dictconfig`: its loggers keep their levels but hand their records to the root
    logger, which writes them in Wharf's format (incremental: no handler of its own is made)."""
    return {
        "version": 1,
        "incremental": True,
        "formatters": {},
        "handlers": {},
        "loggers": {"_granian": {"propagate": True}, "granian.access": {"propagate": True}},
    }
