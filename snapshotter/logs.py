"""Structured logging: one JSON object per line, or plain text for a terminal.

Fields passed with ``extra=`` land in the JSON object. Secrets are never logged in the first
place; this module formats, and keeps chatty libraries quiet. httpx logs every request URL at
INFO, and presigned redirect URLs carry a signature, token requests an account name. httpcore
and hpack log headers at DEBUG. Our own code logs URLs only through ``registry``'s redaction.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

# Libraries whose INFO and DEBUG records may carry URLs with secrets or request headers.
QUIET_LIBRARIES = ("httpx", "httpcore", "hpack", "h2", "h11")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIET_LIBRARIES:
        # Warnings and errors still come through; they carry no request URL.
        logging.getLogger(name).setLevel(logging.WARNING)
