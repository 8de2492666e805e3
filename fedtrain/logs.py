"""Logging of the long-running services (`fedtrain coordinator start`, `fedtrain node start`):
plain text lines for people, or one JSON object a line for log shippers (``--log-format json``)."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from enum import Enum


class LogFormat(str, Enum):
    text = "text"
    json = "json"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, party, message, and the
    exception's traceback as ``exception`` when there is one."""

    def __init__(self, party: str):
        super().__init__()
        self.party = party

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "party": self.party, "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: LogFormat, party: str) -> None:
    """Send the process's log records, at INFO and above, to stderr in ``log_format``;
    ``party`` names the process in each line (``coordinator``, ``node:NAME``)."""
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO)  # also for loggers below INFO that propagate (Flower's is at DEBUG)
    if log_format is LogFormat.json:
        handler.setFormatter(JsonFormatter(party))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {party} %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.captureWarnings(True)  # the libraries' warnings are log lines in the same format
    flower = logging.getLogger("flwr")
    if log_format is LogFormat.json:
        # Flower logs through a console handler of its own: its records go through ours instead.
        from flwr.supercore.logger import console_handler

        flower.removeHandler(console_handler)
    else:
        flower.propagate = False  # its own handler prints them once
