"""Ablations of paper §4.4: location-conditioning variants, plain MoCo's global queue, no neighbour loss, the
ablation config and the runner (a real short pre-training and embedding). Table 7 (random locations) is the
emphysema detection's: tests/test_emphysema_finetune.py."""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, write_patch_cache
from monai.bundle import ConfigParser

from custom.data.atlas import landmark_locations
from custom.embed.cohort import embed_cohort, embed_patches
from custom.embed.cohort import load_network as load_variant_network
from custom.engine.ablation import (
    RUN_KEYS,
    VARIANT_IDS,
    VARIANTS,
    check_inherited,
    get_variant,
    inherited_differences,
    planned_budget,
    training_configs,
    training_settings,
)
from custom.model.conditioning import CONDITIONINGS, HyperConv3d
from custom.model.drasclr import DrasCLR
from custom.model.encoder import DrasCLREncoder
from custom.model.loc_condconv import LocCondConv3d

CONFIGS = REPO_ROOT / "bundle" / "configs"


def _runner():
    spec = importlib.util.spec_from_file_location("run_ablations", REPO_ROOT / "bundle/scripts/run_ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_patch_cache(tmp_path_factory.mktemp("ablation_cache"), num_subjects=1)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_each_conditioning_gives_128d_and_uses_the_location_as_designed(conditioning):
    encoder = DrasCLREncoder(conditioning=conditioning).eval()
    patch = torch.randn(1, 1, 32, 32, 32).expand(2, 1, 32, 32, 32)
    locations = torch.tensor([[-0.5, 0.2, 0.1], [0.6, -0.3, 0.4]])
    with torch.no_grad():
        h, z = encoder(patch, locations)
    assert h.shape == (2, 128) and z.shape == (2, 128)
    if conditioning == "none":
        assert torch.equal(h[0], h[1])
    else:
        assert (h[0] - h[1]).abs().max() > 1e-2 * h.abs().max()  # relative: the init sets the scale


def test_default_encoder_is_unchanged_loc_condconv():
    encoder = DrasCLREncoder()
    convs = [m for name, m in encoder.named_modules() if name.rsplit(".", 1)[-1].startswith("conv")]
    assert len(convs) == 13 and all(isinstance(m, LocCondConv3d) for m in convs)
    keys = set(encoder.state_dict())
    assert "conv1.routing.fc.weight" in keys and not any("fusion" in k or "generator" in k for k in keys)
    assert "location_fusion.fc.weight" in DrasCLREncoder(conditioning="concatenation").state_dict()
    with pytest.raises(ValueError, match="conditioning must be one of"):
        DrasCLREncoder(conditioning="film")


def test_hypernetwork_conv_batched_equals_its_per_sample_definition():
    layer = HyperConv3d(3, 5, stride=2)
    x, p = torch.randn(4, 3, 8, 8, 8), torch.rand(4, 3) * 2 - 1
    expected = torch.cat(
        [torch.nn.functional.conv3d(x[i : i + 1], layer.kernels(p[i : i + 1])[0], layer.bias, 2, 1) for i in range(4)]
    )
    torch.testing.assert_close(layer(x, p), expected, atol=1e-5, rtol=1e-4)
    shared = p[:1].expand(4, 3)
    torch.testing.assert_close(
        layer(x, shared), torch.nn.functional.conv3d(x, layer.kernels(p[:1])[0], layer.bias, 2, 1)
    )
    assert not torch.allclose(layer.kernels(p[:1]), layer.kernels(p[1:2]))


def _local_loss_at(model, landmark):
    torch.manual_seed(1)
    query, key = torch.randn(2, 1, 32, 32, 32), torch.randn(2, 1, 32, 32, 32)
    location = torch.tensor(landmark_locations()[[landmark, landmark]])
    with torch.no_grad():
        return model(query, key, location, torch.tensor([landmark, landmark]), update=False)["loss_local"]


@pytest.mark.parametrize("global_queue", [True, False])
def test_plain_moco_queue_is_shared_by_all_landmarks(global_queue):
    model = DrasCLR(num_landmarks=5, queue_size=8, conditioning="none", global_queue=global_queue).eval()
    assert model.queue.keys.shape[0] == (1 if global_queue else 5)
    before = _local_loss_at(model, 3)
    batch = torch.randn(2, 1, 32, 32, 32)
    location = torch.tensor(landmark_locations()[[1, 1]])
    with torch.no_grad():
        model(batch, batch, location, torch.tensor([1, 1]))  # enqueues two keys from landmark 1
    after = _local_loss_at(model, 3)
    if global_queue:
        assert int(model.queue.ptr[0]) == 2
        assert not torch.allclose(before, after)  # the landmark-1 keys are negatives for landmark 3
    else:
        assert int(model.queue.ptr[1]) == 2 and int(model.queue.ptr[3]) == 0
        torch.testing.assert_close(before, after)


@pytest.mark.parametrize("global_queue", [True, False])
def test_a_batch_reading_one_queue_trains(global_queue):
    """Every plain-MoCo batch, and every batch in the reference's one-landmark order, reads a single queue that
    the same step then writes: the backward pass must still work."""
    model = DrasCLR(num_landmarks=4, queue_size=8, conditioning="none", global_queue=global_queue)
    batch = torch.randn(2, 1, 32, 32, 32)
    out = model(batch, batch, torch.zeros(2, 3), torch.tensor([2, 2]))
    out["loss"].backward()
    assert model.encoder_q.conv1.weight.grad.abs().sum() > 0


def test_zero_neighbours_disables_the_neighbour_loss():
    model = DrasCLR(num_landmarks=4, queue_size=8, conditioning="none").eval()
    query = torch.randn(2, 1, 32, 32, 32)
    location = torch.tensor(landmark_locations()[[0, 2]])
    with torch.no_grad():
        out = model(
            query,
            query,
            location,
            torch.tensor([0, 2]),
            neighbours=torch.zeros(2, 0, 1, 32, 32, 32),
            neighbour_locations=torch.zeros(2, 0, 3),
        )
    assert "loss_neighbour" not in out and torch.equal(out["loss"], out["loss_local"])


def test_ablation_config_sets_each_variant(cache):
    files = [str(CONFIGS / "train.yaml"), str(CONFIGS / "ablation.yaml")]
    expected = {
        "plain_moco": ("none", 1, 16, 0),
        "neighbours_3": ("loc_condconv", 581, 16, 3),
        "conditioning_hypernetwork": ("hypernetwork", 581, 16, 0),
    }
    for name, (conditioning, queues, size, neighbours) in expected.items():
        parser = ConfigParser(ConfigParser.load_config_files(files))
        parser.update({"variant": name, "dataset_dir": str(cache)})
        model = parser.get_parsed_content("network_def")
        assert model.encoder_q.conditioning == conditioning
        assert tuple(model.queue.keys.shape[:2]) == (queues, size)
        item = parser.get_parsed_content("train#dataset")[5]
        assert item["neighbours"].shape[0] == neighbours, name
    parser = ConfigParser(ConfigParser.load_config_files(files))
    parser.update({"variant": "random_location"})  # Table 7 moved to the detection run
    with pytest.raises(RuntimeError) as error:  # MONAI wraps the error of a config expression
        parser.get_parsed_content("conditioning")
    assert "no longer a pre-training variant" in str(error.value.__cause__)
    assert "emphysema_finetune.yaml" in str(error.value.__cause__)
    with pytest.raises(ValueError, match="unknown ablation variant"):
        get_variant("mocov3")


TRAINED = list(VARIANTS)


def _own(settings: dict) -> dict:
    """Settings without those a variant may set itself (its switches, outputs and record)."""
    return {k: v for k, v in settings.items() if k not in VARIANT_IDS}


@pytest.mark.parametrize("paper", [False, True])
def test_every_variant_trains_with_drasclrs_budget_schedule_order_and_data(cache, paper):
    """Like for like: each variant's merged config holds every training setting of the DrasCLR run given the
    same overrides (compared generically, so settings added to train.yaml later are covered), plans the same
    iterations x batch, queue length K and lr schedule, and draws the same batches."""
    overrides = {"dataset_dir": str(cache), "max_epochs": 2, "epoch_length": 5, "batch_size": 4, "seed": 3}
    drasclr, _ = training_configs("neighbours_2", paper, **overrides)
    for key in ("max_epochs", "epoch_length", "batch_size", "seed", "queue_size", "order"):
        assert key in drasclr.get()  # the settings the comparison below must cover
    reference = training_settings(drasclr, drasclr)
    batches = None
    for name in TRAINED:
        drasclr, variant = training_configs(name, paper, **overrides)
        assert inherited_differences(drasclr, variant) == {}, name
        settings = training_settings(drasclr, variant)
        assert _own(settings) == _own(reference), name
        budget = planned_budget(variant)
        assert (budget["iterations"], budget["batch_size"], budget["max_epochs"], budget["epoch_length"]) == (
            10,
            4,
            2,
            5,
        ), name
        assert budget["queue_size"] == reference["queue_size"] == (4096 if paper else 16), name
        assert budget["num_queues"] == (1 if VARIANTS[name].global_queue else 581), name
        if not paper:  # the paper's one-landmark order needs 128 subjects; the cache has one
            assert variant.get_parsed_content("lr_scheduler#T_max") == drasclr.get_parsed_content("lr_scheduler#T_max")
            sampler = iter(variant.get_parsed_content("train#sampler"))
            drawn = [next(sampler) for _ in range(40)]
            reference_sampler = iter(drasclr.get_parsed_content("train#sampler"))
            assert drawn == [next(reference_sampler) for _ in range(40)], name
            assert batches is None or drawn == batches
            batches = drawn


def test_a_variant_config_that_changes_a_training_setting_is_refused(tmp_path):
    from monai.bundle import ConfigParser

    tampered = tmp_path / "ablation.yaml"
    tampered.write_text(
        (CONFIGS / "ablation.yaml").read_text()
        + "max_epochs: 1\npretraining_def#queue_size: 4096\ntrain#sampler#seed: 7\n"
    )
    drasclr, _ = training_configs("plain_moco")
    variant = ConfigParser()
    variant.read_config([str(CONFIGS / "train.yaml"), str(tampered)])
    variant.update({"variant": "plain_moco"})
    assert set(inherited_differences(drasclr, variant)) == {
        "max_epochs",
        "pretraining_def#queue_size",
        "train#sampler#seed",
    }
    with pytest.raises(ValueError, match="would not train like DrasCLR"):
        check_inherited(drasclr, variant, "plain_moco")


def test_weights_that_do_not_fit_the_variant_are_refused(tmp_path):
    torch.save(
        {f"encoder.{k}": v for k, v in DrasCLREncoder(conditioning="none").state_dict().items()}, tmp_path / "none.pt"
    )
    with pytest.raises(ValueError, match="do not fit the 'loc_condconv' encoder"):
        load_variant_network(tmp_path / "none.pt", conditioning="loc_condconv")
    with pytest.raises(FileNotFoundError, match="model weights not found"):
        load_variant_network(tmp_path / "absent.pt")


def test_runner_pretrains_plain_moco_embeds_and_resumes(cache, tmp_path, capsys):
    out = tmp_path / "ablations"
    run = _runner().main
    run(
        dataset_dir=str(cache),
        out_dir=str(out),
        variants="plain_moco",
        max_epochs=1,
        epoch_length=2,
        batch_size=4,
        num_workers=0,
        mlflow=True,
    )
    for name in ("plain_moco",):
        table = pd.read_csv(out / name / "subject_embeddings.csv", dtype={"subject_id": str})
        assert list(table["subject_id"]) == ["sub000"] and table.shape == (1, 129)
        patches = np.load(out / name / "patch_embeddings" / "sub000.npy")
        assert patches.shape == (581, 128) and np.isfinite(patches).all()
        np.testing.assert_allclose(table.iloc[0, 1:].to_numpy(float), patches.mean(0), rtol=1e-5, atol=1e-6)
    record = json.loads((out / "plain_moco" / "variant.json").read_text())
    assert record["variant"]["global_queue"] and record["variant"]["conditioning"] == "none"
    # The budget it got, recorded and logged: what the DrasCLR run with the same overrides plans.
    drasclr, _ = training_configs(
        "plain_moco", dataset_dir=str(cache), max_epochs=1, epoch_length=2, batch_size=4, num_workers=0, seed=0
    )
    assert record["budget"] == {
        "iterations": 2,
        "batch_size": 4,
        "max_epochs": 1,
        "epoch_length": 2,
        "order": drasclr.get("order"),
        "queue_size": drasclr.get("queue_size"),
        "num_queues": 1,
    }
    ran = {k: v for k, v in record["settings"].items() if k not in RUN_KEYS}  # not where or how it ran
    assert _own(ran) == _own({k: v for k, v in training_settings(drasclr, drasclr).items() if k not in RUN_KEYS})
    table = pd.read_csv(out / "ablations.csv").set_index("variant")
    assert table.loc["plain_moco", ["iterations", "batch_size", "queue_size"]].tolist() == [2, 4, 16]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    params = client.search_runs([client.get_experiment_by_name("drasclr_ablation").experiment_id])[0].data.params
    assert {
        k: params[k]
        for k in (
            "iterations",
            "batch_size",
            "max_epochs",
            "epoch_length",
            "queue_size",
            "num_queues",
            "seed",
            "learning_rate",
            "order",
        )
    } == {
        "iterations": "2",
        "batch_size": "4",
        "max_epochs": "1",
        "epoch_length": "2",
        "queue_size": "16",
        "num_queues": "1",
        "seed": "0",
        "learning_rate": str(drasclr.get("learning_rate")),
        "order": drasclr.get("order"),
    }
    assert set(record["settings"]) <= set(params)  # every inherited setting is an MLflow param
    trained = torch.load(out / "plain_moco" / "pretrained.pt")
    assert "encoder.conv1.weight" in trained and trained["encoder.conv1.weight"].shape == (8, 1, 3, 3, 3)
    # only what was asked (+ mlruns/: the MLflow artifacts of the run, beside mlruns.db)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["mlruns", "plain_moco"]
    # The stored patch embeddings are the variant network's embeddings of the cached patches at their landmarks.
    network = load_variant_network(out / "plain_moco" / "pretrained.pt", conditioning="none")
    patches_hu = np.load(cache / "sub000" / "patches.npy")[:64]
    expected = embed_patches(network, patches_hu, landmark_locations()[:64])
    np.testing.assert_allclose(
        np.load(out / "plain_moco" / "patch_embeddings" / "sub000.npy")[:64], expected, rtol=1e-5, atol=1e-6
    )
    again = embed_cohort(
        cache, out / "plain_moco" / "pretrained.pt", tmp_path / "again", conditioning="none", progress=False
    )
    pd.testing.assert_frame_equal(
        again,
        pd.read_csv(out / "plain_moco" / "subject_embeddings.csv", dtype={"subject_id": str}),
        rtol=1e-6,
        atol=1e-7,
    )
    # A second run skips the finished variants.
    stamp = (out / "plain_moco" / "variant.json").stat().st_mtime_ns
    run(
        dataset_dir=str(cache),
        out_dir=str(out),
        variants="plain_moco",
        max_epochs=1,
        epoch_length=2,
        batch_size=4,
        num_workers=0,
        mlflow=False,
    )
    assert (out / "plain_moco" / "variant.json").stat().st_mtime_ns == stamp
    assert "finished in an earlier run" in capsys.readouterr().out
    assert set(VARIANTS) >= {"plain_moco", "neighbours_0"} and "random_location" not in VARIANTS
