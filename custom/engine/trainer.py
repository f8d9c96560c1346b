"""The DrasCLR pre-training engine: a MONAI ``Trainer`` (ignite) whose iteration is one MoCo step.

Per iteration: query/key/neighbour embeddings, local + neighbour losses against the landmark queues, SGD step
(optional gradient clipping, AMP on GPU), EMA of the key encoder and the enqueue (inside ``DrasCLR.forward``).
The output dict (losses, top-1 accuracies, lr, patches/s) is what the progress bar, the MLflow handler and
``engine.state.metrics`` read.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence

import torch
from ignite.engine import Events
from monai.engines import Trainer

from custom.data.patch_dataset import PassSampler
from custom.engine.distributed import is_distributed

BATCH_KEYS = ("query", "key", "location", "landmark_ids", "neighbours", "neighbour_locations")
LOGGED = ("loss", "loss_local", "loss_neighbour", "acc_local", "acc_neighbour")


class DrasCLRTrainer(Trainer):
    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        epoch_length: Optional[int] = None,
        grad_clip_norm: Optional[float] = None,
        amp: bool = False,
        train_handlers: Optional[Sequence] = None,
    ):
        device = torch.device(device)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            handlers=train_handlers,
            amp=amp and device.type == "cuda",
            decollate=False,
        )
        self.network = network
        self.optimizer = optimizer
        self.grad_clip_norm = grad_clip_norm
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        sampler = getattr(train_data_loader, "sampler", None)
        if isinstance(sampler, PassSampler):
            self.add_event_handler(Events.EPOCH_STARTED, self._position_sampler, sampler)

    @staticmethod
    def _position_sampler(engine: "DrasCLRTrainer", sampler: PassSampler) -> None:
        """When the engine is about to open a data iterator (the first epoch of a run, fresh or resumed), start
        the sampler's stream at the engine's iteration. Later epochs go on with the open iterator (or the next
        pass when it runs dry), so the stream never depends on where a run was stopped."""
        if engine._dataloader_iter is None:  # ignite opens the iterator right after EPOCH_STARTED
            sampler.set_position(engine.state.iteration)

    def _iteration(self, engine: "DrasCLRTrainer", batchdata: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        start = time.perf_counter()
        batch = {k: batchdata[k].to(engine.state.device, non_blocking=engine.non_blocking) for k in BATCH_KEYS}
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", enabled=self.amp):
            out = self.network(**batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at iteration {engine.state.iteration}")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        world = torch.distributed.get_world_size() if is_distributed() else 1
        output = {k: float(out[k].detach()) for k in LOGGED if k in out}
        output["lr"] = float(self.optimizer.param_groups[0]["lr"])
        output["patches_per_s"] = batch["query"].shape[0] * world / (time.perf_counter() - start)
        engine.state.metrics.update(output)
        return output


class TrainingProgressBar:
    """A tqdm progress bar showing the step's losses, accuracies, lr and patches/s (rank 0 only)."""

    def __init__(self, persist: bool = True):
        self.persist = persist

    def attach(self, engine) -> None:
        from ignite.handlers import ProgressBar

        if is_distributed() and torch.distributed.get_rank() > 0:
            return
        ProgressBar(persist=self.persist).attach(
            engine, output_transform=lambda out: {k: round(v, 3) for k, v in out.items()}
        )
