"""DrasCLR components referenced by the bundle configs (``bundle/configs``), one concept per module:

- ``data``: the atlas and its landmarks, locations, intensities, augmentations, the training dataset and order;
- ``prepare``: CT -> lung mask -> registration to the atlas -> 581 landmark patches (the prepared cache);
- ``model``: Loc-CondConv, the encoder, split BatchNorm, the landmark queues, the losses, DrasCLR, the
  single-tensor network and the official-checkpoint import;
- ``engine``: the training engine, checkpoints, DDP helpers, training curves, baselines and ablations;
- ``embed``: patch and subject embeddings; ``emphysema``: fine-tuning, detection and maps;
  ``evaluation``: readouts, survival, tables; ``synthetic``: the SYNTHETIC demo cohort; ``zoo``: Model Zoo
  conformance and export;
- shared utilities: ``atomic_io`` (atomic writes), ``flags`` (the one boolean parser), ``figures``, ``errors``
  (missing-input errors, reported as one console line: importing ``custom`` installs that report),
  ``processes`` (worker processes that end with their parent).
"""

__version__ = "0.1.0"

from pathlib import Path as _Path


def bundle_root() -> str:
    """The bundle folder: ``<repo>/bundle`` in a checkout, the folder holding ``custom/`` in an exported bundle."""
    here = _Path(__file__).resolve().parent.parent
    return str(here / "bundle") if (here / "bundle" / "configs").is_dir() else str(here)


from custom.errors import install_excepthook as _install_excepthook  # noqa: E402

_install_excepthook()  # an uncaught missing-input error is one console line (DRASCLR_TRACEBACK=1: the traceback)
