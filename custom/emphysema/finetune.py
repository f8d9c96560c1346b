"""Fine-tune the emphysema detectors on annotated boxes (paper §4.3.1).

A ``monai.engines.SupervisedTrainer`` trains ``EmphysemaDetectors`` (the map model: one binary detector per subtype,
each on healthy boxes vs that subtype's boxes; ``DetectorTrainingStep`` + ``DetectorLoss``) or one
``EmphysemaNetwork`` (a binary detector of the cross-validation, or the 3-class extra) with cross-entropy on the
32^3 patches centred at the boxes (``custom.emphysema.labelled_patches``), starting from the pre-trained DrasCLR
encoder (``models/pretrained.pt``) or from a random initialisation (the "from scratch" baseline).
``freeze_encoder=True`` is the paper's linear readout (only the linear layers learn, the encoders stay
bit-identical, BatchNorm statistics included); ``False`` is full fine-tuning. Given a seed, a run is deterministic
on CPU. The bundle config ``configs/emphysema_finetune.yaml`` builds the engine declaratively; ``finetune`` here is
the Python route the cross-validation uses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events
from ignite.metrics import Average
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, RandAffine, RandGaussianNoise
from monai.utils import set_determinism
from torch import nn
from torch.utils.data import DataLoader

from custom.atomic_io import atomic_path
from custom.data.intensity import HALF_RANGE
from custom.data.location import PATCH_SIZE
from custom.emphysema.labelled_patches import LabelledPatchDataset, LabelledPatches
from custom.emphysema.network import (
    EMPHYSEMA_CLASSES,
    NUM_EMPHYSEMA_CLASSES,
    EmphysemaDetectors,
    EmphysemaNetwork,
    load_pretrained_encoder,
    same_encoders,
)
from custom.model.network import DrasCLRNetwork
from custom.model.weights import load_into, read_state


def emphysema_network(
    pretrained_path: str | Path | None = None,
    freeze_encoder: bool = False,
    seed: int = 0,
    mode: str = "grouped",
    num_classes: int = NUM_EMPHYSEMA_CLASSES,
) -> EmphysemaNetwork:
    """A classifier whose random initialisation depends only on ``seed``; encoder from ``pretrained_path`` if
    given (else "from scratch"). ``num_classes`` 2 is a binary detector (healthy vs one subtype)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = EmphysemaNetwork(num_classes=int(num_classes), freeze_encoder=freeze_encoder, mode=mode)
    if pretrained_path:
        load_pretrained_encoder(network, pretrained_path)
    return network


def trainable_parameters(network: torch.nn.Module) -> list:
    """The parameters that learn (the linear layer only under linear readout)."""
    return [p for p in network.parameters() if p.requires_grad]


def class_weights(labels, num_classes: int = NUM_EMPHYSEMA_CLASSES, balance: bool = True) -> torch.Tensor:
    """Cross-entropy class weights: ``n / (classes present * count)`` per class (1 for all when not balancing;
    0 for a class absent from the training set, which then plays no part)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    if not balance:
        return torch.ones(num_classes, dtype=torch.float32)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(weights, dtype=torch.float32)


class IntensityOnly:
    """Apply a MONAI intensity transform to channel 0 (the CT) only: the location channels are not an image."""

    def __init__(self, transform):
        self.transform = transform

    def set_random_state(self, seed=None, state=None):
        self.transform.set_random_state(seed=seed, state=state)
        return self

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = torch.as_tensor(image).clone()
        image[0:1] = torch.as_tensor(self.transform(image[0:1]))
        return image


def box_augmentation(seed: int = 0, prob: float = 0.5) -> Compose:
    """Mild MONAI augmentation of a 4-channel box patch: a small affine (border padding keeps the constant
    location channels constant) and Gaussian noise of 50 HU on the intensity channel."""
    transform = Compose(
        [
            RandAffine(
                prob=prob,
                rotate_range=(math.pi / 18,) * 3,
                translate_range=(4.0,) * 3,
                scale_range=(0.05,) * 3,
                padding_mode="border",
                spatial_size=(PATCH_SIZE,) * 3,
            ),
            IntensityOnly(RandGaussianNoise(prob=prob, std=50.0 / HALF_RANGE)),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


def training_loader(dataset, batch_size: int = 8, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """Shuffled batches (seeded order); the last short batch is dropped, as BatchNorm needs more than one."""
    if len(dataset) < 2:
        raise ValueError(f"fine-tuning needs at least 2 annotated boxes, got {len(dataset)}")
    batch_size = max(2, min(int(batch_size), len(dataset)))
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator, num_workers=num_workers
    )


@torch.no_grad()
def encoder_features(network: EmphysemaNetwork, patches: LabelledPatches, indices, batch_size: int = 32):
    """(n, 128) representations of the box patches by the (frozen, eval-mode) encoder."""
    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    out = []
    for start in range(0, len(indices), batch_size):
        x = torch.stack([patches.inputs(int(i)) for i in indices[start : start + batch_size]]).to(device)
        out.append(DrasCLRNetwork.forward(network, x).float().cpu())
    network.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, network.classifier.in_features))


class DetectorHeads(nn.Module):
    """The linear layers of ``EmphysemaDetectors`` with fixed encoders, trained on encoder features computed once:
    input (B, K, D), detector k reads ``[:, k]`` (its own encoder's features)."""

    def __init__(self, network: EmphysemaDetectors):
        super().__init__()
        self.heads = nn.ModuleList([network.detectors[name].classifier for name in network.subtypes])

    def detector_logits(self, index: int, features: torch.Tensor) -> torch.Tensor:
        return self.heads[index](features[:, index])


def detector_features(network: EmphysemaDetectors, patches: LabelledPatches, indices) -> torch.Tensor:
    """(n, K, D) every detector's encoder features of the boxes (computed once when the encoders are identical,
    as linear readouts of one pre-trained encoder are)."""
    detectors = [network.detectors[name] for name in network.subtypes]
    if same_encoders(detectors):
        features = encoder_features(detectors[0], patches, indices)
        return features[:, None].expand(-1, len(detectors), -1).contiguous()
    return torch.stack([encoder_features(d, patches, indices) for d in detectors], dim=1)


class DetectorLoss(nn.Module):
    """Cross-entropy of each subtype's binary detector on its own boxes (healthy = 0, the subtype = 1), summed over
    the detectors: the paper trains one detector per subtype on healthy vs that subtype's boxes (§4.3.1).
    ``labels``: the training boxes' class indices, for the optional class balance of each detector."""

    def __init__(self, subtypes, labels=None, balance: bool = False):
        super().__init__()
        self.subtypes = tuple(subtypes)
        self.classes = [EMPHYSEMA_CLASSES.index(name) for name in self.subtypes]
        labels = np.asarray([] if labels is None else labels, dtype=np.int64)
        for k, code in enumerate(self.classes):
            own = labels[np.isin(labels, (0, code))]
            self.register_buffer(f"weight_{k}", class_weights((own == code).astype(np.int64), 2, balance=balance))

    def rows(self, index: int, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes of detector ``index``: healthy or its subtype, their binary targets)."""
        rows = (labels == 0) | (labels == self.classes[index])
        return rows, (labels[rows] == self.classes[index]).long()

    def forward(self, logits: list, targets: list) -> torch.Tensor:
        losses = [
            F.cross_entropy(out, target, weight=getattr(self, f"weight_{k}"))
            for k, (out, target) in enumerate(zip(logits, targets))
            if out is not None
        ]
        return torch.stack(losses).sum()


class DetectorTrainingStep:
    """``SupervisedTrainer(iteration_update=...)`` for ``EmphysemaDetectors`` (or its ``DetectorHeads``): each
    detector forwards and is scored on the boxes of its own task only (``engine.loss_function``: ``DetectorLoss``),
    so its BatchNorm never sees the other subtype's boxes; one optimiser step for all. A detector with fewer than
    2 boxes in a batch sits that batch out (train-mode BatchNorm needs 2)."""

    def __call__(self, engine, batchdata) -> dict:
        inputs, labels = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        loss_function = engine.loss_function
        logits, targets = [], []
        for k in range(len(loss_function.subtypes)):
            rows, target = loss_function.rows(k, labels)
            enough = int(rows.sum()) >= 2
            logits.append(engine.network.detector_logits(k, inputs[rows]) if enough else None)
            targets.append(target)
        if all(out is None for out in logits):
            loss = torch.zeros((), device=inputs.device)
        else:
            loss = loss_function(logits, targets)
            loss.backward()
            engine.optimizer.step()
        return {"image": inputs, "label": labels, "loss": loss.detach()}


def training_setup(
    patches: LabelledPatches,
    network: EmphysemaNetwork | EmphysemaDetectors,
    indices=None,
    batch_size: int = 8,
    augment: bool = False,
    seed: int = 0,
    num_workers: int = 0,
):
    """(data loader, module to train). Linear readout without augmentation trains ``network.classifier`` on
    encoder features computed once: the frozen encoder gives the same features every epoch, so this is the
    same optimisation as running it each step, at a fraction of the cost. Otherwise the whole network and
    the 4-channel patches."""
    indices = np.arange(len(patches)) if indices is None else np.asarray(indices, dtype=np.int64)
    labels = torch.as_tensor(patches.labels[indices], dtype=torch.long)
    detectors = isinstance(network, EmphysemaDetectors)
    if network.freeze_encoder and not augment:
        if detectors:
            features, module = detector_features(network, patches, indices), DetectorHeads(network)
        else:
            features, module = encoder_features(network, patches, indices), network.classifier
        dataset = [{"image": f, "label": y} for f, y in zip(features, labels)]
        return training_loader(dataset, batch_size, seed, num_workers=0), module
    dataset = LabelledPatchDataset(patches, indices, transform=box_augmentation(seed) if augment else None)
    return training_loader(dataset, batch_size, seed, num_workers), network


def _loss_value(output) -> float:
    return float(torch.as_tensor(output["loss"]).detach())


class EpochLoss:
    """Mean training loss of every epoch, ignite's ``Average`` metric: ``engine.state.metrics["epoch_loss"]`` (MLflow
    reads it) and ``history``; the latest iteration's loss as ``engine.state.metrics["loss"]``."""

    def __init__(self):
        self.history: list = []
        self.average = Average(output_transform=_loss_value)

    def attach(self, engine) -> None:
        self.average.attach(engine, "epoch_loss")  # reset at every epoch start, computed at its end
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._latest)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _latest(self, engine) -> None:
        engine.state.metrics["loss"] = _loss_value(engine.state.output)

    def _complete(self, engine) -> None:
        self.history.append(engine.state.metrics["epoch_loss"])


class LossProgressBar:
    """A tqdm bar with the current loss (ignite's ``ProgressBar``)."""

    def __init__(self, persist: bool = False, desc: str = "fine-tune"):
        self.persist, self.desc = persist, desc

    def attach(self, engine) -> None:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=self.persist, desc=self.desc).attach(
            engine, output_transform=lambda out: {"loss": round(float(torch.as_tensor(out["loss"]).detach()), 4)}
        )


def save_model(network: torch.nn.Module, path: str | Path) -> Path:
    """Write the ``EmphysemaNetwork`` state dict (``encoder.*`` + ``classifier.*``) atomically."""
    path = Path(path)
    model = getattr(network, "module", network)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


class RecalibrateBatchNorm:
    """At completion of full fine-tuning, recompute the BatchNorm running statistics over the training boxes
    (``torch.optim.swa_utils.update_bn``, one pass, no augmentation). A few small-batch iterations leave the
    running averages far from the data (momentum 0.1 moves them slowly), so the eval-mode network would
    otherwise see mis-normalised activations; with a frozen encoder (linear readout) nothing changes."""

    def __init__(self, network: EmphysemaNetwork, patches: LabelledPatches, indices=None, batch_size: int = 16):
        self.network, self.patches, self.batch_size = network, patches, int(batch_size)
        self.indices = np.arange(len(patches)) if indices is None else np.asarray(indices, dtype=np.int64)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine=None) -> None:
        model = getattr(self.network, "module", self.network)
        if getattr(model, "freeze_encoder", False):
            return
        if isinstance(model, EmphysemaDetectors):  # each detector on the boxes of its own task
            labels = self.patches.labels[self.indices]
            for name in model.subtypes:
                own = self.indices[np.isin(labels, (0, EMPHYSEMA_CLASSES.index(name)))]
                self._update(model.detectors[name], own)
        else:
            self._update(model, self.indices)
        model.eval()

    def _update(self, model: torch.nn.Module, indices: np.ndarray) -> None:
        if len(indices) < 2:
            return
        device = next(model.parameters()).device
        # near-equal chunks of at most batch_size: a trailing batch of one box would fail in train-mode BatchNorm
        chunks = np.array_split(indices, max(1, math.ceil(len(indices) / self.batch_size)))
        batches = (torch.stack([self.patches.inputs(int(i)) for i in chunk]) for chunk in chunks)
        with torch.no_grad():
            torch.optim.swa_utils.update_bn(batches, model, device=device)


class SaveEmphysemaModel:
    """At completion, write the classifier as ``models/model.pt`` (the bundle's deployable model), atomically."""

    def __init__(self, model, path: str | Path):
        self.model, self.path = model, Path(path)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine=None) -> None:
        save_model(self.model, self.path)


def load_emphysema_model(path: str | Path, device: str | torch.device = "cpu") -> EmphysemaDetectors | EmphysemaNetwork:
    """The map model a fine-tuning run wrote, in eval mode: ``EmphysemaDetectors`` (keys ``detectors.<subtype>.*``),
    or a single classifier (``encoder.*`` + ``classifier.*``: the 3-class extra or one binary detector)."""
    state = read_state(path)
    subtypes = tuple(dict.fromkeys(k.split(".")[1] for k in state if k.startswith("detectors.")))
    if subtypes:
        network = EmphysemaDetectors(subtypes=subtypes)
    elif "classifier.weight" in state:
        network = EmphysemaNetwork(num_classes=int(state["classifier.weight"].shape[0]))
    else:
        raise ValueError(
            f"{path}: neither emphysema detectors nor a classifier (keys start {next(iter(state), None)!r})"
        )
    return load_into(network, state, path, "emphysema model").to(device).eval()


@dataclass
class FinetuneResult:
    network: EmphysemaNetwork
    epoch_losses: list = field(default_factory=list)
    seconds: float = 0.0
    num_boxes: int = 0


def finetune(
    patches: LabelledPatches,
    indices=None,
    pretrained_path: str | Path | None = None,
    freeze_encoder: bool = True,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 8,
    seed: int = 0,
    augment: bool = False,
    balance_classes: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = False,
    model_path: str | Path | None = None,
    handlers: list | None = None,
    num_classes: int = NUM_EMPHYSEMA_CLASSES,
) -> FinetuneResult:
    """Train a classifier on the boxes ``indices`` of ``patches`` (all by default); Adam on the trainable
    parameters, class-weighted cross-entropy. Writes ``model_path`` when given. ``num_classes`` outputs, the
    labels of ``patches`` being class indices below it (2: a binary detector on relabelled boxes)."""
    start = time.perf_counter()
    set_determinism(seed=seed)
    device = torch.device(device)
    indices = np.arange(len(patches)) if indices is None else np.asarray(indices, dtype=np.int64)
    network = emphysema_network(pretrained_path, freeze_encoder=freeze_encoder, seed=seed, num_classes=num_classes).to(
        device
    )
    loader, module = training_setup(patches, network, indices, batch_size=batch_size, augment=augment, seed=seed)
    weights = class_weights(patches.labels[indices], num_classes, balance=balance_classes).to(device)
    optimizer = torch.optim.Adam(trainable_parameters(module), lr=lr, weight_decay=weight_decay)
    epoch_loss = EpochLoss()
    train_handlers = [epoch_loss, *(handlers or [])]
    if progress:
        train_handlers.append(LossProgressBar())
    if not freeze_encoder:
        train_handlers.append(RecalibrateBatchNorm(network, patches, indices))
    if model_path:
        train_handlers.append(SaveEmphysemaModel(network, model_path))
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=int(epochs),
        train_data_loader=loader,
        network=module,
        optimizer=optimizer,
        loss_function=torch.nn.CrossEntropyLoss(weight=weights),
        train_handlers=train_handlers,
        decollate=False,
    )
    trainer.run()
    network.eval()
    return FinetuneResult(network, epoch_loss.history, time.perf_counter() - start, len(indices))
