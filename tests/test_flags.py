"""On/off settings given as strings on the command line (``--pictures false``) mean what they say."""

from __future__ import annotations

import pytest
from conftest import REPO_ROOT
from monai.bundle import ConfigParser

from custom.engine.checkpointing import resume_path
from custom.flags import as_bool


@pytest.mark.parametrize(
    "value,expected",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("True", True),
        (" yes ", True),
        ("1", True),
        ("false", False),
        ("False", False),
        ("no", False),
        ("0", False),
        ("off", False),
    ],
)
def test_as_bool(value, expected):
    assert as_bool(value) is expected


def test_as_bool_rejects_other_words():
    with pytest.raises(ValueError, match="maybe"):
        as_bool("maybe")


def test_resume_false_as_a_string_does_not_resume(tmp_path):
    assert resume_path(tmp_path, "false") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resume_path(tmp_path, "true")


def test_inference_config_reads_string_flags():
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundle" / "configs" / "inference.yaml"))
    parser.update({"folded": "false", "progress": "False", "pictures": "false"})
    inferer = parser.get_parsed_content("inferer")
    assert inferer.folded is False and inferer.progress is False
    report = parser.get_parsed_content("postprocessing").transforms[0]
    assert report.pictures is False


def test_ablation_config_reads_its_queue_switch_as_a_flag():
    """``--global_queue false`` on the command line turns plain MoCo's single queue off (was: on, 'false' is truthy)."""
    configs = REPO_ROOT / "bundle" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.yaml"), str(configs / "ablation.yaml")])
    parser.update({"variant": "plain_moco", "global_queue": "false"})
    assert parser.get_parsed_content("pretraining_def#global_queue") is False
    assert parser.get_parsed_content("hyper_parameters#num_queues") == 581
    parser.update({"global_queue": "True"})
    assert parser.get_parsed_content("pretraining_def#global_queue", lazy=False) is True
