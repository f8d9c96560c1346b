"""The evaluation's running record of skipped inputs and adaptations: logged as they happen, written to
``notes.txt`` at the end (and logged to MLflow with the other outputs)."""

from __future__ import annotations

import logging

logger = logging.getLogger("custom.evaluation")


class Notes:
    """Skipped inputs and adaptations, logged as they happen and written to ``notes.txt``."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, text: str) -> None:
        logger.info(text)
        self.lines.append(text)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
