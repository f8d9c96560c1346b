"""Export the bundle as a self-contained folder (and zip) that runs without this repository.

    python bundle/scripts/export_bundle.py --out_dir dist --zip true      # needs models/model.pt
    PYTHONPATH=dist/drasclr_lung_ct python -m custom.zoo.verify --bundle_dir dist/drasclr_lung_ct --mode full
    PYTHONPATH=dist/drasclr_lung_ct python -m monai.bundle run inference \
        --config_file dist/drasclr_lung_ct/configs/inference.yaml --input scan.nii.gz ...

``models/model.pt`` is required (an error names it and the finetune workflow); ``--include_model false`` makes a
development export without it. ``large_files.yml`` of the export lists exactly the weights shipped, with their
sha256. See ``custom/zoo/export.py`` for what is shipped and what stays behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The folder holding ``custom``: the repo root in a checkout, the bundle folder in an exported bundle.
_here = Path(__file__).resolve()
sys.path.insert(0, str(next((p for p in _here.parents if (p / "custom" / "__init__.py").is_file()), _here.parents[2])))

from custom.flags import argparse_bool  # noqa: E402
from custom.zoo.export import export_bundle  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True, help="folder that receives <name>/ and <name>_v<version>.zip")
    parser.add_argument("--bundle_root", default=None, help="bundle to export (default: this bundle)")
    parser.add_argument("--name", default=None, help="exported folder name (default: from metadata name)")
    for flag, default, text in [
        ("zip", False, "also write <name>_v<version>.zip"),
        (
            "include_model",
            True,
            "ship models/model.pt (required) and models/model.ts when there; false: a "
            "development export without weights, which the Model Zoo's checks refuse",
        ),
        ("include_pretrained", False, "ship models/pretrained.pt (the pre-trained encoder)"),
        ("torchscript", False, "script models/model.pt into models/model.ts inside the export"),
        ("overwrite", False, "replace an existing export"),
    ]:
        parser.add_argument(f"--{flag}", type=argparse_bool, nargs="?", const=True, default=default, help=text)
    parser.add_argument(
        "--inference_config",
        default="configs/inference.yaml",
        help="config whose network_def is scripted with --torchscript",
    )
    args = parser.parse_args(argv)
    result = export_bundle(**vars(args))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
