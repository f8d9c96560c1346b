"""The pre-training baselines and ablations of paper §4.4 (Tables 6 and 8), each a named variant of the method.

A variant fixes three training choices:

- ``conditioning``: how the atlas location p enters the encoder (``custom.model.conditioning``; Table 6),
- ``global_queue``: one dictionary of negatives shared by all landmarks (plain MoCo) instead of one per landmark,
- ``num_neighbours``: l, the neighbours of the neighbour loss; 0 trains with the local loss only (Table 8).

Table 7 (random instead of true locations) is an emphysema-detection experiment, not a pre-training variant: the
detection run does it (``custom.emphysema.random_location``, ``emphysema_finetune.yaml``: ``random_location``).

Table 6 trains every conditioning with the local loss only (§4.4.1), so its Loc-CondConv row is the
``neighbours_0`` variant; ``neighbours_2`` is the full method (DrasCLR). The paper's "MoCo" baseline works on
whole volumes; ``plain_moco`` is its patch version: no location, one global queue, no neighbour loss.
This module holds the registry, trains a variant through the bundle's training config (train.yaml +
ablation.yaml) and embeds a cohort with a variant's weights through ``custom.embed.cohort.embed_cohort``
(with the representation network of the variant's ``encoder_def``, as it was trained).

Like for like: a variant run merges the same train.yaml (+ paper.yaml) and the same overrides as the DrasCLR run
it is compared with, and ablation.yaml only sets the variant's switches (``VARIANT_IDS``), so the budget
(iterations x batch), the schedule, the batch order, the data and every other training setting are inherited.
``inherited_differences`` checks that before each variant trains; the record (``variant.json``) and the MLflow
params hold what the variant got (``budget``, ``settings``).
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import custom
from custom.atomic_io import atomic_path
from custom.embed.cohort import embed_cohort
from custom.flags import as_bool
from custom.model.network import DrasCLRNetwork


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    conditioning: str = "loc_condconv"
    global_queue: bool = False
    num_neighbours: int = 2


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "plain_moco",
            "MoCo on patches: no location, one global queue, local loss only (Tables 2-5 'MoCo', "
            "adapted to patches)",
            conditioning="none",
            global_queue=True,
            num_neighbours=0,
        ),
        Variant(
            "conditioning_none",
            "Table 6 'No conditioning': standard CNN, per-landmark queues, local loss only",
            conditioning="none",
            num_neighbours=0,
        ),
        Variant(
            "conditioning_concatenation",
            "Table 6 'Concatenation': last-layer feature + p fused by a fully " "connected layer, local loss only",
            conditioning="concatenation",
            num_neighbours=0,
        ),
        Variant(
            "conditioning_hypernetwork",
            "Table 6 'HyperNetwork': an MLP of p generates every kernel, local " "loss only",
            conditioning="hypernetwork",
            num_neighbours=0,
        ),
        Variant(
            "neighbours_0",
            "Table 6 'Loc-CondConv' and Table 8 'no neighbouring contrast': local loss only",
            num_neighbours=0,
        ),
        Variant("neighbours_1", "Table 8: neighbour loss with 1 neighbour", num_neighbours=1),
        Variant("neighbours_2", "Table 8 / the method (DrasCLR): neighbour loss with 2 neighbours", num_neighbours=2),
        Variant("neighbours_3", "Table 8: neighbour loss with 3 neighbours", num_neighbours=3),
    )
}
ALIASES = {"drasclr": "neighbours_2", "conditioning_loc_condconv": "neighbours_0"}
# Former variants and where their experiment lives now.
MOVED = {
    "random_location": "Table 7 (random vs patch locations) is the emphysema detection run's: "
    "python -m monai.bundle run detection --config_file bundle/configs/emphysema_finetune.yaml "
    "(random_location: true)"
}


def get_variant(name: str) -> Variant:
    """The variant called ``name`` (aliases resolve to their canonical variant)."""
    canonical = ALIASES.get(name, name)
    if canonical in MOVED:
        raise ValueError(f"{name!r} is no longer a pre-training variant: {MOVED[canonical]}")
    if canonical not in VARIANTS:
        raise ValueError(f"unknown ablation variant {name!r}; choose from {sorted(VARIANTS) + sorted(ALIASES)}")
    return VARIANTS[canonical]


def trainable_variant(name: str) -> Variant:
    """The variant called ``name`` (what ablation.yaml trains; every variant is pre-trained)."""
    return get_variant(name)


def ablation_config_files(paper: bool = False, variant: bool = True) -> list[str]:
    """train.yaml (+ paper.yaml for the paper's schedule) + ablation.yaml, in merge order; without ablation.yaml
    (``variant=False``): the files of the DrasCLR run the variants are compared with."""
    configs = Path(custom.bundle_root()) / "configs"
    names = ["train.yaml"] + (["paper.yaml"] if as_bool(paper) else []) + (["ablation.yaml"] if variant else [])
    return [str(configs / n) for n in names]


# What ablation.yaml may set differently from the DrasCLR run: the variant's switches, where its outputs go and
# how it is recorded. Anything else of train.yaml (+ paper.yaml) is inherited (checked by inherited_differences).
VARIANT_IDS = (
    "num_neighbours",
    "encoder_def#conditioning",
    "pretraining_def#global_queue",
    "output_dir",
    "model_path",
    "experiment_name",
    "run_name",
    "hyper_parameters",
)
# Settings that say how a run executes, not what it trains: a finished variant is reused whatever they were.
RUN_KEYS = (
    "resume",
    "num_workers",
    "checkpoint_every",
    "mlflow",
    "tracking_uri",
    "output_dir",
    "ckpt_dir",
    "model_path",
    "experiment_name",
    "run_name",
)


def training_configs(name: str, paper: bool = False, **overrides):
    """(DrasCLR config, variant config): unresolved parsers of train.yaml [+ paper.yaml] with ``overrides``, and
    of the same files + ablation.yaml with the same overrides and ``variant=name``."""
    from monai.bundle import ConfigParser

    parsers = []
    for files, extra in (
        (ablation_config_files(paper, variant=False), {}),
        (ablation_config_files(paper), {"variant": trainable_variant(name).name}),
    ):
        parser = ConfigParser()
        parser.read_config(files)
        parser.update({**overrides, **extra})
        parsers.append(parser)
    return tuple(parsers)


def _leaves(config, prefix: str = "") -> dict:
    """{id: value} of every leaf of a config (ids joined by '#', list items by index)."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else None
    if items is None:
        return {prefix: config}
    leaves = {}
    for key, value in items:
        leaves.update(_leaves(value, f"{prefix}#{key}" if prefix else str(key)))
    return leaves


def _allowed(config_id: str) -> bool:
    return any(config_id == a or config_id.startswith(a + "#") for a in VARIANT_IDS)


def inherited_differences(drasclr, variant) -> dict:
    """{id: (DrasCLR value, variant value)} for every setting under the DrasCLR config's top-level ids that the
    variant config holds differently (raw, before resolution: a changed reference counts), other than
    ``VARIANT_IDS``. Empty when the variant inherits the DrasCLR run's budget, schedule, order, data and model
    settings; keys the DrasCLR config does not have (the variant's own) are not compared."""
    missing = "<not set>"
    ours = _leaves({k: drasclr.get(k) for k in drasclr.get()})
    theirs = _leaves({k: variant.get(k, missing) for k in drasclr.get()})
    return {
        i: (ours.get(i, missing), theirs.get(i, missing))
        for i in sorted(set(ours) | set(theirs))
        if not _allowed(i) and ours.get(i, missing) != theirs.get(i, missing)
    }


def _plain(value) -> bool:
    """A literal setting: not an expression, reference, macro or component."""
    return (
        value is None
        or isinstance(value, (bool, int, float))
        or (isinstance(value, str) and not value.startswith(("$", "@", "%")))
    )


def training_settings(drasclr, variant) -> dict:
    """Every top-level literal setting of the DrasCLR config (schedule, optimiser, order, seeds, model sizes,
    data folder, ... whatever train.yaml holds), resolved in the variant config: what the variant trains with."""
    return {k: variant.get_parsed_content(k) for k, v in drasclr.get().items() if _plain(v)}


def planned_budget(variant) -> dict:
    """The budget a variant config plans: batch, epochs, iterations per epoch (None: a full pass), iterations
    (None until the data fixes a full pass), and the queue (length K, number of queues)."""
    epochs, length = variant.get_parsed_content("max_epochs"), variant.get_parsed_content("epoch_length")
    return {
        "iterations": epochs * length if length else None,
        "batch_size": variant.get_parsed_content("batch_size"),
        "max_epochs": epochs,
        "epoch_length": length,
        "order": variant.get_parsed_content("order"),
        "queue_size": variant.get_parsed_content("pretraining_def#queue_size"),
        "num_queues": (
            1
            if as_bool(variant.get_parsed_content("pretraining_def#global_queue"))
            else variant.get_parsed_content("pretraining_def#num_landmarks")
        ),
    }


def check_inherited(drasclr, variant, name: str) -> None:
    """Refuse a variant whose config changes a training setting of the DrasCLR run (not like for like)."""
    differences = inherited_differences(drasclr, variant)
    if differences:
        lines = "; ".join(f"{i}: DrasCLR {a!r}, variant {b!r}" for i, (a, b) in differences.items())
        raise ValueError(
            f"variant {name!r} would not train like DrasCLR (ablation.yaml may only set "
            f"{', '.join(VARIANT_IDS)}): {lines}"
        )


def _comparable(settings: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in RUN_KEYS}, default=str))


def check_reusable(out_dir: str | Path, settings: dict) -> None:
    """Refuse to reuse or resume a variant folder trained with other settings (budget, schedule, data, ...):
    its checkpoints and embeddings would not be like for like with this run."""
    out_dir = Path(out_dir)
    for file, what in ((out_dir / "variant.json", "settings"), (out_dir / "training_settings.json", None)):
        if file.is_file():
            recorded = json.loads(file.read_text())
            recorded = recorded.get(what) if what else recorded
            if recorded is None or _comparable(recorded) != _comparable(settings):
                old, new = _comparable(recorded or {}), _comparable(settings)
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)) if recorded else []
                raise ValueError(
                    f"{out_dir} was trained with other settings ({', '.join(changed) or 'not recorded'}"
                    "): delete it or use another out_dir"
                )


def pretrain_variant(
    name: str, dataset_dir: str | Path, out_dir: str | Path, paper: bool = False, **overrides
) -> tuple[Path, dict]:
    """Pre-train variant ``name`` with the bundle's training workflow (train.yaml [+ paper.yaml] + ablation.yaml).

    Checkpoints go under ``out_dir/checkpoints``, the query encoder to ``out_dir/pretrained.pt``. A run stopped
    part-way resumes from its newest checkpoint. ``overrides`` are config ids (batch_size, max_epochs,
    epoch_length, num_workers, mlflow, tracking_uri, ...), applied as to the DrasCLR run the variant is compared
    with. Returns the weights and ``{"budget": ..., "settings": ...}``: the budget the variant got (iterations
    from the trainer) and every inherited setting, both also logged as MLflow params.
    """
    from monai.bundle import ConfigWorkflow

    from custom.engine.checkpointing import latest_checkpoint

    variant = trainable_variant(name)
    out_dir = Path(out_dir)
    settings = {
        "dataset_dir": str(dataset_dir),
        "output_dir": str(out_dir),
        "model_path": str(out_dir / "pretrained.pt"),
        "resume": latest_checkpoint(out_dir / "checkpoints") is not None,
    }
    settings.update(overrides)
    drasclr, parser = training_configs(variant.name, paper, **settings)
    check_inherited(drasclr, parser, variant.name)
    inherited = training_settings(drasclr, parser)
    check_reusable(out_dir, inherited)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "training_settings.json") as tmp:
        Path(tmp).write_text(json.dumps(inherited, indent=2, default=str))
    logged = parser.get("hyper_parameters") or {}
    mlflow_params = {f"hyper_parameters#{k}": v for k, v in inherited.items() if k not in logged}
    workflow = ConfigWorkflow(
        config_file=ablation_config_files(paper),
        workflow_type="train",
        run_id="training",
        variant=variant.name,
        **settings,
        **mlflow_params,
    )
    workflow.initialize()
    workflow.run()
    budget = planned_budget(workflow.parser)
    budget["iterations"] = int(workflow.parser.get_parsed_content("train#trainer").state.iteration)
    architecture = dict(workflow.parser.get_parsed_content("encoder_def"))
    workflow.finalize()
    return Path(settings["model_path"]), {"budget": budget, "settings": inherited, "architecture": architecture}


def family_run(
    out_dir: str | Path,
    dataset_dir: str | Path,
    variants,
    paper: bool = False,
    enabled: bool = True,
    tracking_uri: str | None = None,
    experiment_name: str = "drasclr_ablation",
    **settings,
):
    """The parent MLflow run of a set of variants (``custom.engine.tracking.WorkflowRun``; experiment
    ``drasclr_ablation`` in ``<out_dir>/mlruns.db`` unless given): tags, the prepared manifest as its dataset, the
    plan and schedule as params, the config files and at the end ``ablations.csv``. Each variant pre-trained
    inside ``with run, run.nested():`` is a child run of it (MLflow's parent tag; the UI groups them)."""
    from monai.utils import path_to_sqlite_uri

    from custom.engine.tracking import WorkflowRun

    out_dir = Path(out_dir)
    return WorkflowRun(
        tracking_uri=tracking_uri or path_to_sqlite_uri(str(out_dir / "mlruns.db")),
        experiment_name=experiment_name,
        run_name="ablations",
        enabled=enabled,
        dataset_dir=dataset_dir,
        dataset_context="training",
        params={"variants": ",".join(variants), "paper_schedule": as_bool(paper), **settings},
        config_files=ablation_config_files(paper),
        artifacts={"": [out_dir / "ablations.csv"]},
    )


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (data-loader workers): unlike wall time,
    it does not grow when other jobs share the machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def variant_done(out_dir: str | Path) -> bool:
    """A variant folder is finished when its record (written last) and its embedding table exist."""
    out_dir = Path(out_dir)
    return (out_dir / "variant.json").is_file() and (out_dir / "subject_embeddings.csv").is_file()


def run_variant(
    name: str,
    dataset_dir: str | Path,
    out_root: str | Path,
    seed: int = 0,
    paper: bool = False,
    progress: bool = True,
    **train_overrides,
) -> dict:
    """Pre-train and embed one variant into ``out_root/<name>``.

    Returns the record also written to ``out_root/<name>/variant.json``: the variant's settings, the training
    budget it got and every inherited training setting, the weights, and the wall and CPU seconds spent training
    and embedding.
    """
    variant = get_variant(name)
    out_dir = Path(out_root) / variant.name
    record = {
        "variant": asdict(variant),
        "dataset_dir": str(dataset_dir),
        "paper_schedule": as_bool(paper),
        "seed": seed,
        "train_settings": train_overrides,
        "budget": None,
        "settings": None,
    }
    start, cpu = time.perf_counter(), cpu_seconds()
    weights, trained = pretrain_variant(variant.name, dataset_dir, out_dir, paper, seed=seed, **train_overrides)
    record.update(trained)
    record["weights"] = str(weights)
    record["train_seconds"] = round(time.perf_counter() - start, 1)
    record["train_cpu_seconds"] = round(cpu_seconds() - cpu, 1)
    start, cpu = time.perf_counter(), cpu_seconds()
    embed_cohort(dataset_dir, weights, out_dir, network=DrasCLRNetwork(**record["architecture"]), progress=progress)
    record["embed_seconds"] = round(time.perf_counter() - start, 1)
    record["embed_cpu_seconds"] = round(cpu_seconds() - cpu, 1)
    with atomic_path(out_dir / "variant.json") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2, default=str))
    return record
