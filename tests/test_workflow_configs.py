"""The declarative workflow configs (evaluate.yaml, generate.yaml, emphysema_finetune.yaml): every setting is read
by a component (none is silently ignored), every component takes exactly the arguments the config gives it, the
settings mappings refuse unknown keys, and a component swapped on the command line is the one that runs."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import REPO_ROOT
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator, ConfigComponent
from monai.bundle.reference_resolver import ReferenceResolver

CONFIGS = REPO_ROOT / "bundle" / "configs"
WORKFLOWS = {  # config -> its run ids (entry points: read by `monai.bundle run <id>`, by nothing else)
    "evaluate.yaml": {"evaluate", "run"},
    "generate.yaml": {"run"},
    "emphysema_finetune.yaml": {"initialize", "finetune", "run", "detection"},
}
SEP = ReferenceResolver.sep


def _references(node) -> set[str]:
    """Every id referenced (``@id``, in references and expressions) anywhere in ``node``."""
    if isinstance(node, dict):
        return set().union(*(_references(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_references(v) for v in node)) if node else set()
    if isinstance(node, str):
        return set(ReferenceResolver.match_refs_pattern(node))
    return set()


def _read_by(config_id: str, refs: set[str]) -> bool:
    """The id, or a section holding it, is referenced."""
    parts = config_id.split(SEP)
    return any(SEP.join(parts[:n]) in refs for n in range(1, len(parts) + 1))


def _unread(node, config_id: str, refs: set[str]) -> list[str]:
    """Ids under ``config_id`` that no component or expression reads. A component (``_target_``) reads its own
    arguments (checked against its signature separately) but must itself be referenced; a plain section is read
    when it is referenced as a whole, otherwise each entry must be."""
    if _read_by(config_id, refs):
        return []
    if isinstance(node, dict) and not ConfigComponent.is_instantiable(node):
        return [i for key, value in node.items() for i in _unread(value, f"{config_id}{SEP}{key}", refs)]
    return [config_id]


def _components(node, config_id: str = ""):
    """(id, config) of every component in ``node``, nested ones included."""
    if isinstance(node, dict):
        if ConfigComponent.is_instantiable(node):
            yield config_id, node
        for key, value in node.items():
            yield from _components(value, f"{config_id}{SEP}{key}" if config_id else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _components(value, f"{config_id}{SEP}{index}")


def _raw(name: str) -> dict:
    return ConfigParser.load_config_file(str(CONFIGS / name))


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_every_setting_is_read_by_a_component(name):
    config = _raw(name)
    run_ids = WORKFLOWS[name]
    assert run_ids <= set(config), f"{name}: run ids {sorted(run_ids - set(config))} missing"
    refs = _references(config)
    unread = [i for key, value in config.items() if key not in run_ids | {"imports"} for i in _unread(value, key, refs)]
    assert unread == [], f"{name}: settings no component reads: {unread}"
    for run_id in run_ids - {"initialize"}:  # each workflow ends in a short run expression
        entries = config[run_id] if isinstance(config[run_id], list) else [config[run_id]]
        assert len(entries) <= 2 and all(isinstance(e, str) and len(e) <= 40 for e in entries), (run_id, entries)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_every_component_takes_exactly_its_config_arguments(name):
    locator = ComponentLocator()
    checked = 0
    for config_id, node in _components(_raw(name)):
        target = ConfigComponent(node, locator=locator).resolve_module_name()  # short MONAI names resolved
        module, _, attribute = target.rpartition(".")
        obj = getattr(__import__(module, fromlist=[attribute]), attribute)
        parameters = inspect.signature(obj).parameters
        arguments = {k for k in node if not (k.startswith("_") and k.endswith("_"))}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            assert arguments <= set(parameters), f"{name} {config_id}: {sorted(arguments - set(parameters))}"
        if target.startswith("custom."):
            assert not any(p.kind is p.VAR_KEYWORD for p in parameters.values()), f"{config_id} takes **kwargs"
        checked += 1
    assert checked >= 3


def test_settings_mappings_refuse_unknown_keys():
    from custom.evaluation.readout_analysis import LinearReadout, ReadoutAnalysis
    from custom.evaluation.survival_analysis import SurvivalAnalysis
    from custom.evaluation.tables import TableWriter

    with pytest.raises(ValueError, match=r"target 'gold': unknown setting\(s\) \['exclued'\]"):
        ReadoutAnalysis(LinearReadout(), {"gold": {"column": "gold", "kind": "ordinal", "exclued": [-1]}})
    with pytest.raises(ValueError, match="kind must be one of"):
        ReadoutAnalysis(LinearReadout(), {"gold": {"kind": "grade"}})
    with pytest.raises(ValueError, match=r"table 't2': unknown setting\(s\) \['row'\]"):
        TableWriter("/tmp", layouts={"t2": {"row": ["DrasCLR"], "columns": ["gold:accuracy"]}})
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['walk'\]"):
        SurvivalAnalysis(bode={"walk": "six_minute_walk_m"})
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "evaluate.yaml"))
    parser.update({"survival#penalty": 1.0})  # a misspelt component setting stops the run
    with pytest.raises(RuntimeError) as error:
        parser.get_parsed_content("survival")
    assert "penalty" in str(error.value.__cause__ or error.value)


def test_evaluate_config_builds_its_components_and_takes_overrides(tmp_path):
    from custom.evaluation.workflow import Evaluation

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "evaluate.yaml"))
    parser.update(
        {
            "output_dir": str(tmp_path),
            "readout#pca_components": 3,
            "survival#repeats": 2,
            "baselines#random_init_seed": 7,
            "covid_cohort": None,
            "synthetic": "false",
        }
    )
    evaluation = parser.get_parsed_content("evaluation")
    assert isinstance(evaluation, Evaluation)
    assert evaluation.phenotypes.readout.pca_components == 3 and evaluation.survival.repeats == 2
    assert evaluation.cohort.baselines.random_init_seed == 7 and evaluation.severity_cohort is None
    assert evaluation.tables.caption == "" and evaluation.tables.out_dir == tmp_path / "tables"
    assert [type(f).__name__ for f in evaluation.figures] == ["FractionByGold", "LabelEfficiencyPlot"]


def test_a_component_swapped_on_the_command_line_runs(tmp_path):
    """``--covid#_target_`` replaces the COVID-like generator by a user's subclass (here: every subject CT-4)."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "severe_covid.py").write_text(
        "from custom.synthetic.covid_like import CovidLikeGenerator\n\n\n"
        "class SevereCovid(CovidLikeGenerator):\n"
        "    def __init__(self, **settings):\n"
        "        super().__init__(grade_probs=[0, 0, 0, 0, 1], **settings)\n"
    )
    out = tmp_path / "cohort"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(REPO_ROOT)]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(CONFIGS / "generate.yaml"),
        "--output_dir",
        str(out),
        "--num_subjects",
        "1",
        "--covid_subjects",
        "2",
        "--voxel_size",
        "6.0",
        "--dicom_every",
        "0",
        "--progress",
        "false",
        "--covid#_target_",
        "severe_covid.SevereCovid",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    covid = pd.read_csv(out / "covid_clinical.csv")
    assert covid["grade"].tolist() == [4, 4] and (covid["measured_grade"] == 4).all()  # the swapped generator ran
    assert pd.read_csv(out / "cohort.csv")["subject_id"].tolist() == ["SYN0000"]  # the COPD-like one as configured


# ---- one architecture id: encoder_def (configs/network.yaml) in every workflow that builds the encoder
ARCHITECTURE_USERS = {  # config -> the network id built from encoder_def
    "network.yaml": "representation_def",
    "train.yaml": "pretraining_def",
    "embed.yaml": "representation_def",
    "evaluate.yaml": "baselines",
    "emphysema_finetune.yaml": "classifier_def",
    "inference.yaml": "classifier_def",
}


def test_every_workflow_carries_the_same_encoder_def():
    reference = _raw("network.yaml")["encoder_def"]
    assert set(reference) == {"representation_dim", "projection_dim", "num_experts", "conditioning"}
    for name in ARCHITECTURE_USERS:
        assert _raw(name)["encoder_def"] == reference, f"{name}: encoder_def differs from network.yaml's"


def _sizes(encoder) -> tuple:
    return encoder.representation_dim, encoder.projection_dim, encoder.num_experts, encoder.conditioning


@pytest.mark.parametrize("name", sorted(ARCHITECTURE_USERS))
def test_an_encoder_def_override_changes_the_network_each_workflow_builds(name):
    """--encoder_def#... on the command line reaches the encoder of every workflow (no sizes left in Python)."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / name))
    parser.update(
        {
            "encoder_def#representation_dim": 16,
            "encoder_def#projection_dim": 8,
            "encoder_def#num_experts": 2,
            "encoder_def#conditioning": "concatenation",
        }
    )
    built = parser.get_parsed_content(ARCHITECTURE_USERS[name])
    if name == "evaluate.yaml":  # the random-init baseline's encoder
        from custom.evaluation.baselines import random_init_network

        built = random_init_network(0, built.architecture)
    if hasattr(built, "detectors"):  # the map model: every subtype detector's encoder
        encoders = [detector.encoder for detector in built.detectors.values()]
    else:
        encoders = [built.encoder_q if name == "train.yaml" else built.encoder]
    for encoder in encoders:
        assert _sizes(encoder) == (16, 8, 2, "concatenation")
        assert encoder.fc[-1].out_features == 8


def test_weights_of_other_sizes_fail_naming_the_file_and_the_sizes(tmp_path):
    """A pre-trained file of other sizes is refused by embed with the sizes to set, not a bare shape error."""
    import torch

    from custom.embed.cohort import load_network
    from custom.model.network import DrasCLRNetwork

    small = DrasCLRNetwork(representation_dim=16, projection_dim=8, num_experts=2)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"small\.pt.*representation_dim=128.*--encoder_def"):
        load_network(tmp_path / "small.pt")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "embed.yaml"))
    parser.update({"encoder_def#representation_dim": 16, "encoder_def#projection_dim": 8, "encoder_def#num_experts": 2})
    loaded = load_network(tmp_path / "small.pt", network=parser.get_parsed_content("representation_def"))
    assert loaded.encoder.representation_dim == 16
