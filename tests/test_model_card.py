"""The model card beside the emphysema weights (models/model.json): what they were trained on, trusted only for
the weights whose SHA-1 it holds, and the warning a SYNTHETIC-trained model's maps carry on other scans."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch

from custom.emphysema.model_card import SYNTHETIC_WARNING, card_path, map_warning, model_provenance, write_model_card
from custom.synthetic.writer import is_synthetic_scan, save_nifti


def _scans(tmp_path):
    synthetic = save_nifti(tmp_path / "syn.nii.gz", np.full((4, 4, 4), -800), np.eye(4))
    real = tmp_path / "real.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), -800, np.int16), np.eye(4)), str(real))
    return synthetic, real


def test_card_records_the_training_data_and_is_trusted_only_for_its_weights(tmp_path):
    synthetic, real = _scans(tmp_path)
    assert is_synthetic_scan(synthetic) and not is_synthetic_scan(real)
    weights = tmp_path / "model.pt"
    torch.save({"encoder.w": torch.zeros(2)}, weights)

    assert model_provenance(weights)["synthetic_training_data"] is None  # no card: unknown, no claim
    write_model_card(weights, "boxes.csv", {"a": synthetic, "b": synthetic}, boxes=10)
    card = json.loads(card_path(weights).read_text())
    assert card["subjects"] == 2 and card["synthetic_subjects"] == 2 and card["boxes"] == 10
    provenance = model_provenance(weights)
    assert provenance["trained_on"] == "SYNTHETIC demo cohort" and provenance["synthetic_training_data"] is True
    assert map_warning(provenance, real) == SYNTHETIC_WARNING
    assert map_warning(provenance, synthetic) is None

    write_model_card(weights, "boxes.csv", {"a": real}, boxes=3)
    provenance = model_provenance(weights)
    assert provenance["trained_on"] == "real scans" and map_warning(provenance, real) is None

    write_model_card(weights, "boxes.csv", {"a": synthetic, "b": real}, boxes=3)
    assert model_provenance(weights)["trained_on"] == "1 SYNTHETIC + 1 real subjects"

    torch.save({"encoder.w": torch.ones(2)}, weights)  # other weights under the same name: the card is stale
    stale = model_provenance(weights)
    assert stale["synthetic_training_data"] is None and "another weights file" in stale["trained_on"]
