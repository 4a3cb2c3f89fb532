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


def setup(cfg: LoggingConfig, *, stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.addFilter(_ConnFilter())
    if cfg.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(conn)s] %(message)s", "%Y-%m-%d %H:%M:%S")
        )
    root = logging.getLogger("postfach")
    root.handlers[:] = [handler]
    root.setLevel(cfg.level)
    root.propagate = False
