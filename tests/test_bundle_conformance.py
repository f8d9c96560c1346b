"""Model Zoo conformance of bundle/: metadata against the vendored schema, licences and model card, large files,
verify_net_in_out on network_def and the TorchScript export (ckpt_export) round trip."""

import copy
import hashlib
import json
import subprocess
import sys
import warnings
from importlib import metadata as package_metadata
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml
from monai.bundle import ConfigParser, verify_net_in_out
from packaging.requirements import Requirement

from custom.emphysema.network import SUBTYPES, EmphysemaDetectors
from custom.zoo import conformance

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLE = REPO_ROOT / "bundle"
INFERENCE_CONFIG = BUNDLE / "configs" / "inference.yaml"
SCHEMA = json.loads((BUNDLE / conformance.SCHEMA_RELPATH).read_text())
METADATA = json.loads((BUNDLE / conformance.METADATA_RELPATH).read_text())


def _write_json(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content))
    return path


@pytest.fixture(scope="module")
def network_config(tmp_path_factory) -> Path:
    """The config holding ``network_def``: configs/inference.yaml, or a one-entry config until it exists."""
    if INFERENCE_CONFIG.is_file():
        return INFERENCE_CONFIG
    path = tmp_path_factory.mktemp("config") / "network_def.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "imports": ["$import custom"],
                "network_def": {"_target_": "custom.emphysema.network.EmphysemaDetectors"},
            }
        )
    )
    return path


# The sections of the Model Zoo's model cards (docs/readme_template.md and the cards of models/*/docs/README.md).
ZOO_CARD_SECTIONS = (
    "Authors",
    "Tags",
    "Model Overview",
    "Data",
    "Training configuration",
    "Performance",
    "MONAI Bundle Commands",
    "System Configuration",
    "Limitations",
    "Citation",
    "References",
    "License",
)


def test_bundle_has_the_files_the_zoo_requires():
    assert conformance.check_layout(BUNDLE) == BUNDLE
    card = (BUNDLE / "docs" / "README.md").read_text()
    headings = [line.lstrip("#").strip().strip("*").strip() for line in card.splitlines() if line.startswith("#")]
    for section in ZOO_CARD_SECTIONS + ("Intended use", "Inputs and outputs", "Training data"):
        assert section in headings, f"model card lacks a '{section}' section (has {headings})"
    licence = (BUNDLE / "LICENSE").read_text()
    assert "Apache License" in licence and "batmanlab" in licence and "resources/atlas/LICENSE" in licence
    assert "MIT License" in (BUNDLE / "resources" / "atlas" / "LICENSE").read_text()


def test_metadata_satisfies_the_vendored_schema_offline():
    meta = conformance.verify_bundle_metadata(BUNDLE)
    assert meta["version"] == METADATA["version"] and METADATA["version"] in meta["changelog"]


def test_the_zoo_schema_named_by_the_metadata_is_vendored_unchanged(tmp_path):
    path = conformance.zoo_schema_path(BUNDLE)
    assert path.name == METADATA["schema"].rsplit("/", 1)[-1] == "meta_schema_20240725.json"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == conformance.ZOO_SCHEMA_SHA256[path.name]
    # an edited copy is refused, and so is a schema URL the bundle has no copy of
    root = tmp_path / "bundle"
    (root / "resources" / "schema").mkdir(parents=True)
    (root / "resources" / "schema" / path.name).write_text(path.read_text().replace('"integer"', '"number"'))
    with pytest.raises(ValueError, match="differs from the Model Zoo's schema"):
        conformance.zoo_schema_path(root, METADATA)
    with pytest.raises(FileNotFoundError, match="no offline copy"):
        conformance.zoo_schema_path(root, dict(METADATA, schema="https://example.org/meta_schema_29990101.json"))


SCHEMA_FILES = [conformance.SCHEMA_RELPATH, "resources/schema/meta_schema_20240725.json"]


@pytest.mark.parametrize("schema_file", SCHEMA_FILES)
def test_schemas_resolve_their_refs_as_jsonschema_3_does(schema_file):
    """jsonschema 3.2 (MONAI Label's pin) and 4.0-4.17 resolve ``$ref`` with ``RefResolver``, which joins a relative
    ``$id`` to itself ("unknown url type: 'drasclr-bundle/drasclr-bundle/...'"), and validate a schema whose
    ``$schema`` they do not know as draft-07. The same resolver and draft here: the metadata passes, and a broken
    one fails with a validation error, not a reference error."""
    schema = json.loads((BUNDLE / schema_file).read_text())
    assert "$id" not in schema
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # RefResolver is deprecated in jsonschema 4.18+
        validator = jsonschema.Draft7Validator(schema, resolver=jsonschema.RefResolver.from_schema(schema))
        jsonschema.Draft7Validator.check_schema(schema)
        validator.validate(METADATA)
        broken = copy.deepcopy(METADATA)
        broken["network_data_format"]["inputs"]["image"]["num_channels"] = "four"
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(broken)


@pytest.mark.slow  # the first use builds the MONAI Label venv (conftest.monailabel_python), minutes
@pytest.mark.parametrize("schema_file", SCHEMA_FILES)
def test_schemas_validate_under_monai_labels_jsonschema(monailabel_python, schema_file):
    """The metadata validates under the jsonschema of MONAI Label's venv (3.2), with both schemas."""
    code = (
        "import json, sys, jsonschema; from importlib.metadata import version; "
        "jsonschema.validate(json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))); "
        "print(version('jsonschema'))"
    )
    done = subprocess.run(
        [
            str(monailabel_python),
            "-c",
            code,
            str(BUNDLE / conformance.METADATA_RELPATH),
            str(BUNDLE / schema_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "3.2.0"


@pytest.mark.parametrize("field", SCHEMA["required"])
def test_schema_rejects_metadata_without_a_required_field(tmp_path, field):
    broken = {k: v for k, v in METADATA.items() if k != field}
    with pytest.raises(ValueError, match="does not satisfy"):
        conformance.verify_bundle_metadata(BUNDLE, meta_file=_write_json(tmp_path / "metadata.json", broken))


@pytest.mark.parametrize(
    "where, key",
    [
        (("inputs", "image"), "num_channels"),
        (("inputs", "image"), "modality"),
        (("inputs", "image"), "spatial_shape"),
        (("outputs", "pred"), "num_channels"),
        (("outputs", "pred"), "dtype"),
        (("outputs", "pred"), "channel_def"),
    ],
)
def test_schema_rejects_an_incomplete_network_data_format(tmp_path, where, key):
    broken = copy.deepcopy(METADATA)
    del broken["network_data_format"][where[0]][where[1]][key]
    with pytest.raises(ValueError, match="does not satisfy"):
        conformance.verify_bundle_metadata(BUNDLE, meta_file=_write_json(tmp_path / "metadata.json", broken))


def test_package_list_survives_monai_metadata_parsing(tmp_path):
    """MONAI renames a deprecated ``optional_packages_version`` to ``required_packages_version`` on read,
    replacing the required list; the schema refuses that key, and the list reads back whole."""
    parser = ConfigParser()
    parser.read_meta(f=str(BUNDLE / conformance.METADATA_RELPATH))
    assert parser["_meta_"]["required_packages_version"] == METADATA["required_packages_version"]
    broken = dict(METADATA, optional_packages_version={"mlflow": "3.17.2"})
    with pytest.raises(ValueError, match="does not satisfy"):
        conformance.verify_bundle_metadata(BUNDLE, meta_file=_write_json(tmp_path / "metadata.json", broken))


def test_version_must_be_listed_in_the_changelog(tmp_path):
    broken = dict(METADATA, version="9.9.9")
    with pytest.raises(ValueError, match="not a key of 'changelog'"):
        conformance.verify_bundle_metadata(BUNDLE, meta_file=_write_json(tmp_path / "metadata.json", broken))


def test_network_data_format_describes_what_the_network_returns():
    """``outputs.pred`` is what ``network_def`` returns: (B, 2) float32 logits (unbounded, so no value range), the
    log-odds of each subtype's binary detector in SUBTYPES order. Its ``channel_def`` is the map's label table
    (MAP_LABELS: 0 background, 1 healthy lung, then log-odds i as label i + 2), because MONAI Label builds its label
    list from that field and drops only "background"; the metadata's description says so."""
    image = METADATA["network_data_format"]["inputs"]["image"]
    pred = METADATA["network_data_format"]["outputs"]["pred"]
    assert (image["num_channels"], image["spatial_shape"], image["dtype"]) == (4, [32, 32, 32], "float32")
    assert image["value_range"] == [-1, 1] and image["channel_def"]["0"].startswith("intensity")
    assert (pred["type"], pred["format"], pred["value_range"]) == ("logits", "classes", [])
    from custom.emphysema.network import MAP_LABELS

    assert pred["channel_def"] == {str(i): name for i, name in enumerate(MAP_LABELS)}
    assert tuple(MAP_LABELS[2:]) == SUBTYPES and pred["num_channels"] == len(SUBTYPES)
    assert "log-odds i becomes map label i + 2" in METADATA["description"]
    parser = ConfigParser()
    parser.read_config(str(INFERENCE_CONFIG))
    net = parser.get_parsed_content("network_def").eval()
    x = torch.rand(2, 4, 32, 32, 32) * 2 - 1
    with torch.no_grad():
        out = net(x)
    assert list(out.shape) == [2, pred["num_channels"], *pred["spatial_shape"]]
    assert str(out.dtype) == f"torch.{pred['dtype']}"
    # logits, not probabilities: channel i is detector i's linear head, logit 1 minus logit 0, not normalised
    with torch.no_grad():
        for i, name in enumerate(SUBTYPES):
            detector = net.detectors[name]
            logits = detector.classifier(detector.embed(x))
            assert torch.allclose(out[:, i], logits[:, 1] - logits[:, 0])


def test_metadata_describes_the_map_labels_and_uses_the_zoo_vocabulary():
    """The voxel map's labels (not the patch classifier's classes) are in pred_classes and the description;
    data_type names the readers' libraries as the Zoo's bundles do (nibabel, dicom)."""
    from custom.emphysema.network import MAP_LABELS

    assert MAP_LABELS[0] == "background"
    for text in (METADATA["pred_classes"], METADATA["description"]):
        assert "0 outside the lung (background)" in text, text
        for value, name in enumerate(MAP_LABELS[1:], start=1):
            assert f"{value} {name}" in text, (value, name, text)
    assert [t.strip() for t in METADATA["data_type"].split(",")] == ["nibabel", "dicom"]
    assert METADATA["eval_metrics"] == {}  # no evaluation on real data (docs/README.md, Performance)


def test_package_versions_agree_with_the_declared_stack():
    """Every version in the metadata satisfies the requirements pyproject.toml declares (as installed);
    exact pins equal the installed versions; every declared package is listed."""
    runtime = [Requirement(line) for line in package_metadata.requires("drasclr-bundle")]
    runtime = [req for req in runtime if not (req.marker and "extra" in str(req.marker))]  # test/lint extras
    declared = {req.name.lower(): req for req in runtime}
    listed = dict(METADATA["required_packages_version"])
    listed.update(monai=METADATA["monai_version"], torch=METADATA["pytorch_version"], numpy=METADATA["numpy_version"])
    missing = sorted(set(declared) - set(listed))
    assert not missing, f"pyproject dependencies absent from metadata.json: {missing}"
    installed = conformance.installed_versions(listed)
    for name, version in listed.items():
        req = declared[name.lower()]
        assert req.specifier.contains(version, prereleases=True), f"{name} {version} does not satisfy {req}"
        if any(spec.operator == "==" for spec in req.specifier):
            assert installed[name] == version, f"{name}: metadata {version}, installed {installed[name]}"


def test_large_files_list_the_weights_and_hashes_are_checked(tmp_path):
    paths = [entry["path"] for entry in conformance.read_large_files(BUNDLE)]
    assert {"models/model.pt", "models/model.ts", "models/pretrained.pt"} <= set(paths)

    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    (root / "models" / "model.pt").write_bytes(b"weights")
    entry = {"path": "models/model.pt", "url": "", "hash_type": "md5", "hash_val": "d" * 32}
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))
    with pytest.raises(ValueError, match="md5 differs"):
        conformance.verify_large_files(root)
    entry["hash_val"] = hashlib.md5(b"weights").hexdigest()
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry]}))
    assert conformance.verify_large_files(root) == [root / "models" / "model.pt"]
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": [{"path": "../outside.pt", "url": ""}]}))
    with pytest.raises(ValueError, match="inside the bundle"):
        conformance.read_large_files(root)
    # An export's list: every listed file must be there with its hash (else the Zoo's CI would download it).
    entry["hash_val"] = hashlib.md5(b"weights").hexdigest()
    absent = {"path": "models/model.ts", "url": ""}
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": [entry, absent]}))
    assert conformance.verify_large_files(root) == [root / "models" / "model.pt"]
    with pytest.raises(ValueError, match="lists models/model.ts, which is not there"):
        conformance.verify_large_files(root, require_present=True)
    (root / "large_files.yml").write_text(yaml.safe_dump({"large_files": []}))  # an export without weights
    assert conformance.read_large_files(root) == []
    assert conformance.verify_large_files(root, require_present=True) == []


def test_verify_net_in_out_on_network_def(network_config):
    conformance.verify_network(network_config, BUNDLE)
    # The check is real: a metadata that promises another number of classes is rejected.
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(BUNDLE / conformance.METADATA_RELPATH),
            config_file=str(network_config),
            device="cpu",
            bundle_root=str(BUNDLE),
            **{"_meta_#network_data_format#outputs#pred#num_channels": 5},
        )


def test_ckpt_export_torchscript_gives_the_eager_outputs(tmp_path, network_config):
    net = EmphysemaDetectors().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a lost buffer would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)

    ts_path = conformance.export_torchscript(network_config, BUNDLE, ckpt_file=ckpt, filepath=tmp_path / "model.ts")
    scripted, meta = conformance.load_torchscript(ts_path)
    scripted.eval()
    assert meta["version"] == METADATA["version"]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == len(SUBTYPES)

    x = torch.rand(3, 4, 32, 32, 32) * 2 - 1  # three different locations (the grouped convolution path)
    same = x.clone()
    same[:, 1:4] = x[0:1, 1:4]  # one shared location (the plain convolution path)
    with torch.no_grad():
        for batch in (x, same):
            expected = net(batch)
            assert torch.allclose(scripted(batch), expected, atol=1e-5, rtol=1e-4)
    assert not list(tmp_path.glob(".tmp-*")), "the export left a temporary file behind"


def test_ckpt_export_rejects_a_missing_checkpoint(tmp_path, network_config):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        conformance.export_torchscript(
            network_config, BUNDLE, ckpt_file=tmp_path / "absent.pt", filepath=tmp_path / "model.ts"
        )


def test_check_runs_every_offline_check(network_config):
    summary = conformance.check(BUNDLE, network_config)
    assert summary["version"] == METADATA["version"] and summary["network_verified"]


def test_every_workflow_config_applies_the_bundles_logging_conf():
    """MONAI applies ``<folder of the first config>/logging.conf`` before a workflow: every workflow config (one with a
    ``run`` id), and the overlays in the merge orders the docs and the ablations use, finds configs/logging.conf (no
    "Default logging file ... does not exist"). In a child process: applying it changes the process's logging."""
    configs = BUNDLE / "configs"
    workflows = sorted(p for p in configs.glob("*.yaml") if "run" in (yaml.safe_load(p.read_text()) or {}))
    assert {"train.yaml", "inference.yaml", "prepare.yaml"} <= {p.name for p in workflows}
    overlays = [("train.yaml", "paper.yaml", "multi_gpu_train.yaml"), ("train.yaml", "paper.yaml", "ablation.yaml")]
    runs = [str(p) for p in workflows] + ["+".join(str(configs / name) for name in names) for names in overlays]
    code = (
        "import sys\nfrom monai.bundle import ConfigWorkflow\n"
        "for run in sys.argv[1:]:\n    ConfigWorkflow(config_file=run.split('+'), workflow_type=None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *runs], capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Default logging file" not in output, output[-3000:]
    applied = f"Setting logging properties based on config: {configs / 'logging.conf'}"
    assert output.count(applied) == len(runs), output[-3000:]
