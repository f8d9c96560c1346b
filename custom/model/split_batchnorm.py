"""Split BatchNorm: batch statistics per contiguous sub-batch, so one process behaves like R ranks of DDP.

MoCo's shuffle-BN keeps a query and its positive key from being normalised with the same batch statistics (the
"cheating" leak through BatchNorm, MoCo §3.3). Under DDP each rank normalises its own slice of the global batch
and the keys are permuted across ranks. In one process there is only one slice, so ``SplitBatchNorm3d`` cuts
the batch into ``num_splits`` contiguous sub-batches and normalises each with its own statistics, exactly as
``num_splits`` ranks holding those slices would (the key batch is permuted first, see
``custom.engine.distributed.shuffle_batch``). Running statistics are the mean of the sub-batches' updates (MoCo's
SplitBatchNorm does the same). In eval mode, or with one split, it is plain ``BatchNorm3d``; the state-dict keys
are those of ``BatchNorm3d``, so weights move freely between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm3d(nn.BatchNorm3d):
    def __init__(self, num_features: int, num_splits: int = 1, **kwargs):
        super().__init__(num_features, **kwargs)
        if int(num_splits) < 1:
            raise ValueError(f"bn_splits must be at least 1, got {num_splits}")
        self.num_splits = int(num_splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if x.shape[0] % self.num_splits:
            raise ValueError(
                f"split BatchNorm: a batch of {x.shape[0]} cannot be cut into {self.num_splits} equal sub-batches "
                f"(make the batch size a multiple of bn_splits)"
            )
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        outputs, means, variances = [], [], []
        for chunk in x.chunk(self.num_splits):
            mean = self.running_mean.clone() if self.track_running_stats else None
            var = self.running_var.clone() if self.track_running_stats else None
            outputs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True, factor, self.eps))
            means.append(mean)
            variances.append(var)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(torch.stack(means).mean(0))
                self.running_var.copy_(torch.stack(variances).mean(0))
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_splits={self.num_splits}"


def use_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``BatchNorm3d`` inside ``module`` by a ``SplitBatchNorm3d`` with the same parameters and
    statistics (or set the split count of those already split). Returns ``module``."""
    if int(num_splits) < 1:
        raise ValueError(f"bn_splits must be at least 1, got {num_splits}")
    for name, child in list(module.named_children()):
        if isinstance(child, SplitBatchNorm3d):
            child.num_splits = int(num_splits)
        elif isinstance(child, nn.BatchNorm3d):
            split = SplitBatchNorm3d(
                child.num_features,
                num_splits,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            ).to(device=child.weight.device if child.affine else None)
            split.load_state_dict(child.state_dict())
            split.train(child.training)
            setattr(module, name, split)
        else:
            use_split_batchnorm(child, num_splits)
    return module
