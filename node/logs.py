"""One log stream: Wharf's lines and the HTTP server's own, in the configured format, with `log.fields`."""

from __future__ import annotations

import atexit
import collections
import json
import logging
import sys
import threading
import time
from typing import Any

from .config import LogConfig

_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


# json.dumps(value, default=str), without making an encoder for every line.
_encode = json.JSONEncoder(default=str).encode


def _name(record: logging.LogRecord) -> str:
    """Logger names as operators should read them: granian's Rust core logs as `_granian...`."""
    return record.name[1:] if record.name.startswith("_granian") else record.name


class _Formatter(logging.Formatter):
    """The parts every format shares: the time in UTC, the static fields, the record's own fields."""

    def __init__(self, fields: dict[str, object] | None = None) -> None:
        super().__init__()
        self.fields = dict(fields or {})
        self._second: tuple[int, str] = (-1, "")  # the last second formatted, and how

    def timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        seen, text = self._second
        if second != seen:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return f"{text}.{int(record.msecs):03d}Z"

    def entry(self, record: logging.LogRecord, head: dict[str, Any] | None = None) -> dict[str, Any]:
        """`head` (or nothing), then the static fields, then the record's (a later value of a key
        replaces an earlier one where it stands)."""
        entry: dict[str, Any] = head if head is not None else {}
        entry.update(self.fields)
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["error"] = record.exc_text  # formatted when the record was taken (LineWriter)
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
        return _encode(self.entry(record, head))


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
        return _encode(self.entry(record, head))


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


class LineWriter(logging.Handler):
    """Formats records and writes them to a stream from a thread of its own, a batch at a time.

    A request only appends its record to a queue; the thread wakes once for whatever has gathered,
    so under load one write (and one wake-up) carries many lines. When the log has been quiet, a
    line is written as soon as it comes; while it is busy, the thread lingers a few milliseconds to
    gather more. `stop()` writes what is left.
    """

    _LINGER = 0.005
    _BUSY = 0.05  # a write this recent means the log is busy

    def __init__(self, stream: Any, formatter: logging.Formatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self._stream = stream
        self._pending: collections.deque[logging.LogRecord] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._last_write = 0.0
        self._thread = threading.Thread(target=self._run, name="wharf-log", daemon=True)

    def start(self) -> None:
        self._thread.start()
        atexit.register(self.stop)

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        # No lock: a deque takes appends from any thread, and the writer is the only reader.
        if not self.filter(record):
            return False
        if record.args:
            record.msg, record.args = record.getMessage(), None  # the arguments may change later
        if record.exc_info and not record.exc_text:
            record.exc_text = self.format_exception(record)  # frames are not kept alive
        self._pending.append(record)
        if self._stopping:
            self._write_pending()  # late lines (at exit) are written at once
        elif not self._wake.is_set():
            self._wake.set()
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    def format_exception(self, record: logging.LogRecord) -> str:
        assert record.exc_info is not None
        text = self.formatter.formatException(record.exc_info) if self.formatter else ""
        record.exc_info = None
        return text

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            if time.monotonic() - self._last_write < self._BUSY:
                time.sleep(self._LINGER)
            self._wake.clear()
            self._write_pending()

    def _write_pending(self) -> None:
        lines = []
        pending = self._pending
        while pending:
            record = pending.popleft()
            try:
                lines.append(self.format(record))
            except Exception:
                self.handleError(record)
        if not lines:
            return
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except Exception:
            pass  # stdout is gone (a closed pipe): nothing else to tell
        self._last_write = time.monotonic()

    def stop(self) -> None:
        """Write what is left and end the thread."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._write_pending()


def configure_logging(log: LogConfig | str = "info") -> LineWriter:
    """Route every log record to a thread that writes formatted lines to stdout (see LineWriter).

    Uncaught exceptions and Python warnings become log lines too, so nothing bypasses the format.
    """
    if isinstance(log, str):
        log = LogConfig(level=log)
    global _formatter
    _formatter = formatter_for(log)
    # No format here reads a record's source file, thread or process: do not look them up per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    writer = LineWriter(sys.stdout, _formatter)
    root = logging.getLogger()
    root.handlers = [writer]
    root.setLevel(_LEVELS.get(log.level, logging.INFO))
    # httpx logs every request it sends (webhooks, upstream registries) at info: Wharf says what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    writer.start()
    return writer


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
