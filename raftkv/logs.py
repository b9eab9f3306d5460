"""A node's log: where it goes, how it rotates, and the two formats operators read.

Every node logs to ``LOG_DIR/<node-id>/raftkv.log`` (rotated by size, ``--log-max-mb`` and
``--log-max-files``) and to stderr. ``--log-format text`` is for people; ``json`` is one JSON
object per line for log shippers (Loki, Elasticsearch, CloudWatch), with the same fields.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from enum import StrEnum
from pathlib import Path


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class JsonFormatter(logging.Formatter):
    """One object per line: ts, level, node, logger, msg (and exc, for a traceback)."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self._node = node_id

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "node": self._node,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


# ``extra={FILE_ONLY: True}``: a record for the log file only, because the same words also
# reach the terminal another way (the one-line ``error:`` a failed start-up prints).
FILE_ONLY = "raftkv_file_only"


def configure(
    node_id: str,
    log_dir: Path,
    level: LogLevel = LogLevel.info,
    fmt: LogFormat = LogFormat.text,
    *,
    max_bytes: int = 50 << 20,
    backups: int = 3,
) -> Path:
    """Log to ``log_dir/<node_id>/raftkv.log`` (rotated) and to stderr; return the path."""
    path = log_dir / node_id / "raftkv.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    formatter: logging.Formatter = (
        JsonFormatter(node_id)
        if fmt is LogFormat.json
        else logging.Formatter(
            f"%(asctime)s %(levelname)s {node_id} %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.setLevel(level.value.upper())
    file_handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes, backupCount=backups
    )
    stream = logging.StreamHandler(sys.stderr)
    stream.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    for h in (file_handler, stream):
        h.setFormatter(formatter)
        root.addHandler(h)
    # pysyncobj logs routine reconnects at WARNING; ours say what matters.
    logging.getLogger("pysyncobj").setLevel(logging.ERROR)
    return path
