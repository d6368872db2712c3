"""What `refusal-sae run` prints: one line per finished step, with its time and key number, and Dagster's whole
event log in a file.

Dagster hands every log record to each configured logger; a run configured with none gets Dagster's own
console logger, so runs from the UI, sensors and schedules log as they always do.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import dagster as dg

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"


class StepLines(logging.Handler):
    """Prints a line when a step finishes or fails: `[n/total] step  time  key number`.

    `key_number(step)` gives the number to show for a finished step (e.g. from its materialization's metadata).
    """

    def __init__(self, total: int, key_number: Callable[[str], str], stream: TextIO | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.total, self.key_number, self.stream = total, key_number, stream
        self.started: dict[str, float] = {}
        self.finished = 0

    def emit(self, record: logging.LogRecord) -> None:
        event = (getattr(record, "dagster_meta", None) or {}).get("dagster_event")
        if event is None or not event.step_key:
            return
        kind, step = event.event_type_value, event.step_key
        if kind == "STEP_START":
            self.started[step] = record.created
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE"):
            self.finished += 1
            seconds = record.created - self.started.get(step, record.created)
            what = self.key_number(step) if kind == "STEP_SUCCESS" else "FAILED (see the event log)"
            width = len(str(self.total))
            stream = self.stream or sys.stdout
            stream.write(f"[{self.finished:>{width}}/{self.total}] {step:<28} {_duration(seconds):>7}  {what}\n")
            stream.flush()


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"


_HANDLERS: dict[str, logging.Handler] = {}
"""Handlers a `refusal-sae run` registers for this process, by the name its run config gives `steps`."""


def register(name: str, handler: logging.Handler) -> None:
    _HANDLERS[name] = handler


@dg.logger(config_schema={"handler": str}, description="One line per finished step (`refusal-sae run`).")
def steps(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.Logger("refusal_sae.steps", logging.DEBUG)
    logger.addHandler(_HANDLERS[init_context.logger_config["handler"]])
    return logger


@dg.logger(config_schema={"path": str}, description="Dagster's whole event log, appended to a file.")
def event_file(init_context: dg.InitLoggerContext) -> logging.Logger:
    path = Path(init_context.logger_config["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.Logger("refusal_sae.events", logging.DEBUG)
    logger.addHandler(handler)
    return logger


LOGGERS = {"console": dg.colored_console_logger, "steps": steps, "event_file": event_file}
"""The study job's loggers: Dagster's console logger (the default when a run configures none) and the two above."""
