"""DrasCLR components referenced by the bundle configs (``bundle/configs``).

One concept per module: intensity windowing, atlas locations, Loc-CondConv, the encoder, the single-tensor
network, the landmark-conditioned queue, the contrastive losses, the momentum (MoCo) model, distributed
helpers and the import of the official checkpoint format.
"""

__version__ = "0.1.0"

from pathlib import Path as _Path


def bundle_root() -> str:
    """The bundle folder: ``<repo>/bundle`` in a checkout, the folder holding ``custom/`` in an exported bundle."""
    here = _Path(__file__).resolve().parent.parent
    return str(here / "bundle") if (here / "bundle" / "configs").is_dir() else str(here)
