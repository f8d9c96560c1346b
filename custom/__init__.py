"""DrasCLR components referenced by the bundle configs (``bundle/configs``).

One concept per module: intensity windowing, atlas locations, Loc-CondConv, the encoder, the single-tensor
network, the landmark-conditioned queue, the contrastive losses, the momentum (MoCo) model, distributed
helpers and the import of the official checkpoint format.
"""

__version__ = "0.1.0"
