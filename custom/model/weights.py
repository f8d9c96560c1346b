"""The one reader of the bundle's weights files.

The bundle writes two kinds, both plain state dicts saved with ``torch.save``:
- ``models/pretrained.pt`` (pre-training, ``custom.engine.checkpointing.ExportQueryEncoder``): the
  representation network, keys ``encoder.*``;
- ``models/model.pt`` (emphysema fine-tuning): the classifier, keys ``encoder.*`` and ``classifier.*``.
Every workflow that needs weights reads them here, so a missing or wrong file gives the same clear message:
which file, and which workflow makes it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from custom.errors import MissingInputError

ENCODER_PREFIX = "encoder."
MADE_BY = {"pretrained.pt": "training", "model.pt": "finetune"}  # file name -> custom.errors.WORKFLOWS key


def _made_by(path: Path) -> str:
    return MADE_BY.get(
        path.name,
        "made by the training workflow (configs/train.yaml) or the finetune workflow "
        "(configs/emphysema_finetune.yaml), or imported (embed --official_checkpoint)",
    )


def require_weights(path: str | Path, made_by: str | None = None) -> Path:
    """``path`` when it is a file, else ``custom.errors.MissingInputError`` naming it and the workflow that
    writes it: ``made_by`` (a ``custom.errors.WORKFLOWS`` key), by default found from the file name. Every
    reader of weights checks here, before any slow work."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(path, "model weights", made_by or _made_by(path))
    return path


def read_state(path: str | Path) -> dict:
    """The state dict in ``path``; a missing file or one that is not a state dict raises, naming the file."""
    path = require_weights(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors (a bundle weights file holds one)")
    return state


def encoder_state(path: str | Path, strip_prefix: bool = False) -> dict:
    """The ``encoder.*`` entries of ``path`` (with or without the prefix)."""
    state = read_state(path)
    picked = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not picked:
        raise ValueError(
            f"{path} holds no 'encoder.*' weights (its keys start {next(iter(state), None)!r}): "
            "not a DrasCLR bundle weights file"
        )
    return {k[len(ENCODER_PREFIX) :]: v for k, v in picked.items()} if strip_prefix else picked


def load_into(module: nn.Module, state: dict, path: str | Path, what: str = "network") -> nn.Module:
    """``module.load_state_dict(state)`` (strict), with an error that names the file when shapes or keys differ."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit the {what} ({error})") from error
    return module


def file_sha1(path: str | Path) -> str:
    """Identity of a weights file: outputs stored with it (embeddings, map rows) are reused only for the same one."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
