"""Import of the released DrasCLR checkpoint format (the official COPDGene weights).

That format is a dict with ``state_dict`` holding ``module.encoder_q.*``, ``module.encoder_k.*``,
``module.queue`` (D, K, J) and ``module.queue_ptr`` (J). Its layer names match ``DrasCLREncoder`` except the
routing layer (``_routing_fn.fc`` here ``routing.fc``). The reference stored patches in SimpleITK order
(z, y, x) while this bundle uses (x, y, z), so every 3x3x3 kernel is transposed over its spatial axes; a
convolution commutes with that transposition, and the location normalisation is the same, so the released
weights give the same embeddings for the same anatomy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Union

import torch

from custom.atomic_io import atomic_path
from custom.errors import MissingInputError
from custom.model.drasclr import DrasCLR
from custom.model.encoder import DrasCLREncoder

_PREFIXES = {"encoder_q": "module.encoder_q.", "encoder_k": "module.encoder_k."}


def _load(source: Union[str, Path, Mapping]) -> Mapping[str, torch.Tensor]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise MissingInputError(path, "official checkpoint", "the DrasCLR authors release it (a .pth.tar)")
        try:
            source = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # pragma: no cover - message matters, not the type
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({error})") from error
    state = source.get("state_dict", source) if isinstance(source, Mapping) else None
    if not isinstance(state, Mapping) or not any(k.startswith("module.encoder_q.") for k in state):
        raise ValueError("not the official DrasCLR format: expected a 'state_dict' with 'module.encoder_q.*' keys")
    return state


def convert_encoder_state(official: Mapping[str, torch.Tensor], which: str = "encoder_q") -> Dict[str, torch.Tensor]:
    """Official ``module.encoder_{q,k}.*`` entries -> a ``DrasCLREncoder`` state dict in (x, y, z) layout."""
    prefix = _PREFIXES[which]
    converted: Dict[str, torch.Tensor] = {}
    for name, value in official.items():
        if not name.startswith(prefix):
            continue
        local = name[len(prefix) :].replace("_routing_fn.fc.", "routing.fc.")
        if local.endswith(".weight") and value.dim() == 6:
            # (N, out, in, kz, ky, kx) -> (N, out, in, kx, ky, kz)
            value = value.permute(0, 1, 2, 5, 4, 3)
        converted[local] = value.detach().clone().contiguous()
    if not converted:
        raise ValueError(f"the checkpoint holds no '{prefix}*' entries")
    return converted


def load_official_encoder(
    source: Union[str, Path, Mapping], which: str = "encoder_q", **encoder_kwargs
) -> DrasCLREncoder:
    """A ``DrasCLREncoder`` carrying the released query (or key) encoder weights."""
    state = convert_encoder_state(_load(source), which)
    encoder = DrasCLREncoder(**encoder_kwargs)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"official checkpoint does not fit the encoder: missing {missing}, unexpected {unexpected}")
    return encoder


def load_official_model(source: Union[str, Path, Mapping], **model_kwargs) -> DrasCLR:
    """The whole pre-training model (both encoders, queues and pointers) from the released format."""
    official = _load(source)
    queue = official.get("module.queue")
    if queue is None or queue.dim() != 3:
        raise ValueError("official checkpoint holds no 'module.queue' of shape (D, K, J)")
    dim, size, landmarks = queue.shape
    model_kwargs.setdefault("num_landmarks", landmarks)
    model_kwargs.setdefault("queue_size", size)
    model_kwargs.setdefault("projection_dim", dim)
    model = DrasCLR(**model_kwargs)
    for which in ("encoder_q", "encoder_k"):
        getattr(model, which).load_state_dict(convert_encoder_state(official, which), strict=True)
    model.queue.keys.copy_(queue.permute(2, 1, 0))
    model.queue.ptr.copy_(official["module.queue_ptr"].long())
    return model


def import_to_network(source: Union[str, Path, Mapping], output_path: Union[str, Path], **network_kwargs) -> Path:
    """Write ``models/pretrained.pt`` for the bundle's ``network_def`` from released weights."""
    from custom.model.network import DrasCLRNetwork

    network = DrasCLRNetwork(**network_kwargs)
    network.encoder.load_state_dict(convert_encoder_state(_load(source), "encoder_q"), strict=True)
    output_path = Path(output_path)
    with atomic_path(output_path) as tmp:
        torch.save(network.state_dict(), tmp)
    return output_path
