"""Logging: named loggers postfach.{imap,pop3,smtp,queue,store,auth,access}, a connection id per task."""

from __future__ import annotations

import contextvars
import json
import logging
import sys

from postfach.config import LoggingConfig

connection_id: contextvars.ContextVar[str] = contextvars.ContextVar("connection_id", default="-")

#: ``serve --workers N``: "w0", "w1" ... in a worker, "sup" in the supervisor; put before the
#: connection id of every line ("[w1:imap7]"), so that a log says which process wrote it.
process_tag = ""


class _ConnFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        conn = connection_id.get()
        record.conn = f"{process_tag}:{conn}" if process_tag else conn
        return True


class _OneLineConnectionErrors(logging.Filter):
    """asyncpg's pool logs each failed reconnect ("Failed to restore the pool connection floor")
    with a traceback; while PostgreSQL restarts that is expected, and one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, OSError | TimeoutError):
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "conn": getattr(record, "conn", "-"),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _handler(cfg: LoggingConfig, stream: object) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.addFilter(_ConnFilter())
    if cfg.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(conn)s] %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    return handler


def setup(cfg: LoggingConfig, *, stream: object = None) -> None:
    root = logging.getLogger("postfach")
    root.handlers[:] = [_handler(cfg, stream)]
    root.setLevel(cfg.level)
    root.propagate = False
    # The PostgreSQL driver's own warnings (pool reconnects) in the same format, one line each.
    lib_handler = _handler(cfg, stream)
    lib_handler.addFilter(_OneLineConnectionErrors())
    lib = logging.getLogger("asyncpg")
    lib.handlers[:] = [lib_handler]
    lib.setLevel(logging.WARNING)
    lib.propagate = False
