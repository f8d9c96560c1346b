"""The bundle's user-facing input errors, and the one-line console report of them.

- ``MissingInputError``: a file or folder a workflow needs is not there (weights, a prepared cache, a source CSV,
  a clinical table, ...). The message names the path and the workflow that makes it (``made_by``), e.g.
  ``model weights not found: /tmp/none.pt; made by the finetune workflow (python -m monai.bundle run finetune
  --config_file bundle/configs/emphysema_finetune.yaml)``. It is a ``FileNotFoundError``, so callers that catch
  that keep working.
- ``InputError``: an input that is there but cannot be used (a scan that is not a CT in HU, an unreadable file);
  ``custom.prepare.io`` raises its subclasses.

Importing ``custom`` installs ``install_excepthook()``: when a run ends with one of these errors anywhere in the
exception's cause chain (MONAI's config parser wraps them in ``RuntimeError("Failed to evaluate ...")``), the
console shows one line, ``error: <message>``, instead of a traceback, and the exit status is 1. Set
``DRASCLR_TRACEBACK=1`` to see the full traceback. Any other exception is reported as Python always does.

This module imports nothing heavy: it is loaded with ``custom`` by every config.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TRACEBACK_ENV = "DRASCLR_TRACEBACK"

# workflow -> (what it is called, the command that runs it from the repository root)
WORKFLOWS = {
    "generate": ("the generate workflow", "python -m monai.bundle run --config_file bundle/configs/generate.yaml"),
    "prepare": ("the prepare workflow", "python -m monai.bundle run prepare --config_file bundle/configs/prepare.yaml"),
    "training": (
        "the training workflow",
        "python -m monai.bundle run training --config_file bundle/configs/train.yaml",
    ),
    "finetune": (
        "the finetune workflow",
        "python -m monai.bundle run finetune --config_file bundle/configs/emphysema_finetune.yaml",
    ),
    "embed": ("the embed workflow", "python -m monai.bundle run embed --config_file bundle/configs/embed.yaml"),
    "ablations": ("the ablation script", "python bundle/scripts/run_ablations.py"),
}

# Files and folders of the bundle (relative to bundle_root) -> the workflow that writes them
_BUNDLE_PRODUCTS = (
    ("models/pretrained.pt", "training"),
    ("models/model.pt", "finetune"),
    ("demo_data/synthetic", "generate"),
    ("demo_data/prepared", "prepare"),  # also prepared_covid, prepared_real_ct
    ("demo_data/embeddings", "embed"),  # also embeddings_covid
    ("runs/ablations", "ablations"),
)


class InputError(ValueError):
    """An input that cannot be used; the message names the file and the reason (``custom.prepare.io``)."""


def workflow_command(workflow: str, **overrides) -> str:
    """``'the prepare workflow (python -m monai.bundle run prepare --config_file ... --cache_dir X)'``:
    who makes a missing input and how, with the command-line ``overrides`` that point it at the right place."""
    name, command = WORKFLOWS[workflow]
    extra = "".join(f" --{key} {value}" for key, value in overrides.items() if value is not None)
    return f"{name} ({command}{extra})"


def producer_of(path, default: str | None = None) -> str | None:
    """The workflow (a ``WORKFLOWS`` key) that writes ``path`` when it is one of the bundle's own default
    files or folders (``models/pretrained.pt``, ``demo_data/synthetic/...``), else ``default``."""
    from custom import bundle_root

    try:
        relative = Path(path).resolve().relative_to(Path(bundle_root()).resolve()).as_posix()
    except ValueError:
        return default
    for prefix, workflow in _BUNDLE_PRODUCTS:
        if relative == prefix or relative.startswith(prefix):
            return workflow
    return default


class MissingInputError(FileNotFoundError):
    """A required input of a workflow is missing.

    ``path``: the missing file or folder; ``what``: what it is ("model weights", "clinical table");
    ``made_by``: a ``WORKFLOWS`` key (the message then gives that workflow's command) or a sentence saying
    where the input comes from; ``detail``: a short extra reason ("no manifest.csv")."""

    def __init__(self, path, what: str = "input", made_by: str | None = None, detail: str | None = None, **overrides):
        self.path, self.what, self.detail = str(path), what, detail
        self.made_by = workflow_command(made_by, **overrides) if made_by in WORKFLOWS else made_by
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.what} not found: {self.path}"
        if self.detail:
            text += f" ({self.detail})"
        if self.made_by:
            text += f"; made by {self.made_by}" if self.made_by.startswith("the ") else f"; {self.made_by}"
        return text

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # crosses process boundaries (worker pools) intact
        return (_rebuild, (self.path, self.what, self.made_by, self.detail))


def _rebuild(path, what, made_by_text, detail):
    return MissingInputError(path, what, made_by_text, detail)


def require(path, what: str = "input", made_by: str | None = None, detail: str | None = None, **overrides):
    """``path`` when it exists (file or folder), else ``MissingInputError``; for one-line checks in configs,
    e.g. ``"$custom.errors.require(@model_path, 'model weights', 'finetune')"``. ``None`` or '' passes
    (an optional input that was switched off)."""
    if path is None or str(path) == "":
        return path
    if not os.path.exists(path):
        raise MissingInputError(path, what, made_by, detail, **overrides)
    return path


# ------------------------------------------------------------------------------------------- console report
ONE_LINE_ERRORS = (MissingInputError, InputError)


def input_error_in(error: BaseException | None) -> BaseException | None:
    """The first ``MissingInputError`` or ``InputError`` in ``error``'s chain (itself, then ``__cause__``, or
    ``__context__`` when not suppressed), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ONE_LINE_ERRORS):
            return error
        error = (
            error.__cause__
            if error.__cause__ is not None
            else (None if error.__suppress_context__ else error.__context__)
        )
    return None


def traceback_wanted() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(error: BaseException) -> str:
    """The console line for an input error: its first line, without the traceback."""
    text = str(error).strip().splitlines()
    return f"error: {text[0] if text else type(error).__name__}"


def _excepthook(exc_type, exc, tb, _previous=None):
    found = input_error_in(exc)
    if found is None or traceback_wanted():
        return (_previous or sys.__excepthook__)(exc_type, exc, tb)
    try:
        sys.stderr.write(one_line(found) + "\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed stderr: fall back to Python's report
        return sys.__excepthook__(exc_type, exc, tb)
    return None


def install_excepthook() -> None:
    """Make uncaught input errors one console line (idempotent; other exceptions go to the previous hook)."""
    current = sys.excepthook
    if getattr(current, "_drasclr", False):
        return

    def hook(exc_type, exc, tb):
        return _excepthook(exc_type, exc, tb, _previous=current)

    hook._drasclr = True
    sys.excepthook = hook


__all__ = [
    "InputError",
    "MissingInputError",
    "WORKFLOWS",
    "workflow_command",
    "producer_of",
    "require",
    "input_error_in",
    "install_excepthook",
    "one_line",
]
