"""The service's log format: plain text (the default) or, with DARE_LOG_FORMAT=json, one JSON object per line.

A JSON line has `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `message`, and whichever of
`request_id`, `route`, `method`, `status`, `duration_ms`, `model` the record carries (the access lines of
`service.api.middleware.RequestMetrics` carry them all; `service.api.request_id.RequestIdFilter` puts the request
id on every line of a request), plus `exception` with the traceback when there is one. orjson escapes every control
character, so a client's string cannot break a line.
"""

from __future__ import annotations

import logging
import time

import orjson

EXTRA_FIELDS = ("request_id", "route", "method", "status", "duration_ms", "model")
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            value = record.__dict__.get(name)
            if value is not None and value != "-":  # "-": RequestIdFilter's "outside a request"
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


def configure_json_logging(level: str) -> None:
    """DARE_LOG_FORMAT=json for this process (`dare serve`'s workers): the root logger at `level`; the root's and
    uvicorn's handlers write JSON lines with the request id (RequestIdFilter), and uvicorn's access log gives way to
    the service's own access lines (which carry the route template, the duration and the model)."""
    from service.api.request_id import RequestIdFilter

    logging.basicConfig(level=level.upper())
    formatter = JsonFormatter()
    for name in ("", *UVICORN_LOGGERS):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)
            handler.addFilter(RequestIdFilter())
    logging.getLogger("uvicorn.access").disabled = True


def uvicorn_log_config(fmt: str) -> dict[str, object] | None:
    """uvicorn's `log_config` for `dare serve`: None keeps uvicorn's own (text); "json" writes its lines, from the
    supervisor and the workers alike, as JSON (its access log is off: the service writes its own access lines)."""
    if fmt != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["json"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["json"], "level": "INFO", "propagate": False},
        },
    }
