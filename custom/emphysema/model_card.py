"""What a deployed emphysema model was trained on, kept beside its weights, and the warning its maps carry when
it was trained on SYNTHETIC data and is applied to a scan that is not.

The finetune workflow writes ``models/model.json`` next to ``models/model.pt`` (``WriteModelCard``): the
weights' SHA-1, the annotation table, how many boxes and subjects, and how many of those subjects' scans are
synthetic (``custom.synthetic.writer.is_synthetic_scan``: the generator marks every scan it writes). Inference
reads it back (``model_provenance``) into every report, CSV row and picture title. A card whose SHA-1 is not the
weights' describes another file and is not trusted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ignite.engine import Events

from custom.atomic_io import atomic_path
from custom.model.weights import file_sha1
from custom.synthetic.writer import is_synthetic_scan

SYNTHETIC_WARNING = "model trained on SYNTHETIC data - not a finding"


def card_path(model_path: str | Path) -> Path:
    """``models/model.pt`` -> ``models/model.json``."""
    return Path(model_path).with_suffix(".json")


def describe_training_data(synthetic_subjects: int, subjects: int) -> str:
    if subjects and synthetic_subjects == subjects:
        return "SYNTHETIC demo cohort"
    if synthetic_subjects == 0:
        return "real scans"
    return f"{synthetic_subjects} SYNTHETIC + {subjects - synthetic_subjects} real subjects"


def write_model_card(model_path: str | Path, annotations: str | Path, sources: dict, boxes: int) -> Path:
    """Write the card of the weights at ``model_path``; ``sources``: subject id -> the scan its boxes came from."""
    synthetic = sum(bool(is_synthetic_scan(s)) for s in sources.values() if s)
    card = {
        "model_file": Path(model_path).name,
        "sha1": file_sha1(model_path),
        "task": "per-subtype binary detectors: healthy vs centrilobular, healthy vs paraseptal emphysema (32 mm boxes)",
        "annotations": str(annotations),
        "boxes": int(boxes),
        "subjects": len(sources),
        "synthetic_subjects": synthetic,
        "trained_on": describe_training_data(synthetic, len(sources)),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = card_path(model_path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(card, indent=1))
    return path


def model_provenance(model_path: str | Path) -> dict:
    """{file, sha1, trained_on, synthetic_training_data (True / False / None: unknown)} of the weights."""
    model_path = Path(model_path)
    sha1 = file_sha1(model_path) if model_path.is_file() else None
    out = {
        "file": str(model_path),
        "sha1": sha1,
        "trained_on": "unknown (no model card beside the weights)",
        "synthetic_training_data": None,
    }
    try:
        card = json.loads(card_path(model_path).read_text())
    except (OSError, ValueError):
        return out
    if card.get("sha1") != sha1:
        out["trained_on"] = f"unknown ({card_path(model_path).name} describes another weights file)"
        return out
    out["trained_on"] = card.get("trained_on", out["trained_on"])
    out["task"] = card.get("task", "unknown")  # which model made the map (detectors, or an older 3-class classifier)
    subjects, synthetic = card.get("subjects") or 0, card.get("synthetic_subjects") or 0
    out["synthetic_training_data"] = bool(subjects) and synthetic > 0
    return out


def map_warning(provenance: dict, source: str | Path | None) -> str | None:
    """``SYNTHETIC_WARNING`` when a model trained (even in part) on synthetic scans maps a scan that is not one."""
    if provenance.get("synthetic_training_data") and not (source and is_synthetic_scan(source)):
        return SYNTHETIC_WARNING
    return None


class WriteModelCard:
    """Ignite handler: at completion (after the weights are saved), write ``model.json`` for ``model_path`` from
    the training boxes ``patches`` (their subjects) and the prepared cache's manifest (each subject's source)."""

    def __init__(self, model_path: str | Path, annotations: str | Path, prepared_dir: str | Path, patches):
        self.model_path, self.annotations, self.prepared_dir = Path(model_path), annotations, Path(prepared_dir)
        self.patches = patches

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine=None) -> None:
        from custom.prepare.cache import read_manifest

        subjects = sorted({str(s) for s in self.patches.subject_ids})
        manifest = read_manifest(self.prepared_dir).set_index("subject_id")
        sources = {
            s: (manifest.at[s, "source"] if s in manifest.index and "source" in manifest.columns else None)
            for s in subjects
        }
        write_model_card(self.model_path, self.annotations, sources, len(self.patches))
