"""Shared test settings: deterministic, small, and on the CPU."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DRASCLR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
REAL_CT = Path(os.environ.get("DRASCLR_REAL_CT", SHARED_DATA / "real_ct"))  # the shared chest CT, two kernels
REAL_CT_SERIES = REAL_CT / "lung_pet_ct_dx_A0001" / "soft_kernel_B"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Signs in tools/monailabel_env.sh's output that no package index could be reached (a machine without network).
NO_INDEX = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No matching distribution found",
    "Could not find a version that satisfies",
)


@pytest.fixture(scope="session")
def monailabel_python() -> Path:
    """The python of the MONAI Label venv (MONAI Label 0.8.5, numpy 1, jsonschema 3.2), created once per session
    by tools/monailabel_env.sh (a stamp makes later calls instant). Without a package index it skips outside CI;
    under CI (``CI`` set) every failure fails: a CI run never skips what needs this venv."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "tools" / "monailabel_env.sh")],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        tail = "\n".join(line for line in output.splitlines() if "is ignored" not in line)[-3000:]
        if not os.environ.get("CI") and any(e in output for e in NO_INDEX):
            pytest.skip(f"cannot create the MONAI Label venv: no package index reachable and no cache\n{tail}")
        pytest.fail(f"tools/monailabel_env.sh failed (exit {proc.returncode}):\n{tail}")
    python = REPO_ROOT / proc.stdout.strip().splitlines()[-1]
    if not python.is_file():
        pytest.fail(f"tools/monailabel_env.sh named {python}, which does not exist")
    print(f"\nMONAI Label venv ready in {time.perf_counter() - start:.1f} s: {python}")
    return python


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def _atlas_lung_patches():
    """(581, 32, 32, 32) bool: the atlas lung mask inside every landmark patch."""
    import nibabel as nib
    import numpy as np

    from custom.data.atlas import atlas_mask_path, landmark_corners

    mask = np.asarray(nib.load(str(atlas_mask_path())).dataobj) > 0
    return np.stack([mask[x : x + 32, y : y + 32, z : z + 32] for x, y, z in landmark_corners()])


_LUNG_PATCHES = None


def write_patch_cache(cache_dir: Path, num_subjects: int, seed: int = 0) -> Path:
    """A small prepared cache in the documented format (``<id>/patches.npy`` int16 + ``manifest.csv``):
    atlas anatomy, lung at about -850 HU with per-subject noise and low-attenuation spots."""
    import numpy as np
    import pandas as pd

    global _LUNG_PATCHES
    if _LUNG_PATCHES is None:
        _LUNG_PATCHES = _atlas_lung_patches()
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(num_subjects):
        sid = f"sub{s:03d}"
        hu = np.where(_LUNG_PATCHES, -850.0, 40.0) + rng.normal(0, 25 + 10 * s, _LUNG_PATCHES.shape)
        spots = rng.random(_LUNG_PATCHES.shape) < 0.002 * (s + 1)
        hu[spots & _LUNG_PATCHES] = -990
        (cache_dir / sid).mkdir(parents=True, exist_ok=True)
        np.save(cache_dir / sid / "patches.npy", hu.astype(np.int16))
        rows.append({"subject_id": sid, "status": "ok"})
    pd.DataFrame(rows).to_csv(cache_dir / "manifest.csv", index=False)
    return cache_dir


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory):
    """A small SYNTHETIC demo cohort (4 subjects, 2 mm), generated and prepared with the real workflows."""
    from custom.prepare.workflow import prepare_cohort
    from custom.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("demo")
    generate_cohort(root / "synthetic", num_subjects=4, seed=0, dicom_every=0, progress=False)
    manifest = prepare_cohort(root / "synthetic" / "cohort.csv", root / "prepared", num_workers=1, progress=False)
    assert (manifest["status"] == "ok").all(), manifest
    return root


def hand_cut_box_inputs(boxes, index, stride):
    """The network inputs of the evaluated patches of box ``index``, each cut from its stored region by hand."""
    import numpy as np
    import torch

    from custom.data.intensity import hu_to_network
    from custom.data.location import CORNER_MAX

    axis = [v for v in range(-16, 16) if (v + 16) % stride == stride // 2 % stride]
    out = []
    for dx in axis:
        for dy in axis:
            for dz in axis:
                v = np.array([32 + dx, 32 + dy, 32 + dz])
                hu = boxes.regions[index][v[0] - 16 : v[0] + 16, v[1] - 16 : v[1] + 16, v[2] - 16 : v[2] + 16]
                atlas = (boxes.region_to_atlas[index] @ np.r_[v, 1.0])[:3]
                x = torch.empty(4, 32, 32, 32)
                x[0] = hu_to_network(torch.as_tensor(hu, dtype=torch.float32))
                x[1:] = torch.as_tensor(2.0 * (atlas - 16.0) / np.asarray(CORNER_MAX) - 1.0, dtype=torch.float32).view(
                    3, 1, 1, 1
                )
                out.append(x)
    return torch.stack(out)
