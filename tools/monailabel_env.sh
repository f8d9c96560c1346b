#!/usr/bin/env bash
# Create (or update) the separate virtual environment that serves the bundle with MONAI Label.
#
# MONAI Label 0.8.5 needs numpy<2 (its DICOM-SEG dependency pydicom-seg also needs pydicom<3), while the bundle's
# .venv runs numpy 2 and pydicom 3, so MONAI Label gets its own venv: .venv-monailabel (or $MONAILABEL_VENV).
# It holds MONAI Label, the same torch (CPU build) and monai as .venv, and the bundle's runtime dependencies; the
# bundle itself is NOT installed there: MONAI Label imports `custom` from the exported bundle folder.
# Idempotent: a stamp (the hash of this script) makes a second run return at once.
#
#   bash tools/monailabel_env.sh          # prints the venv's python on its last line
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MONAILABEL_VENV:-.venv-monailabel}
stamp="$VENV/.monailabel-installed"
want=$(sha1sum "tools/monailabel_env.sh" | cut -c1-40)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "$VENV/bin/python"
  exit 0
fi

# Every package pinned (the set pip resolved for monailabel==0.8.5 + monai==1.6.1 + numpy<2 + the bundle's
# runtime dependencies), so a fresh machine gets the environment the test ran with. Changes from that
# resolution: pydicom 2.4.4 with dicomweb-client 0.59.3 and pynetdicom 2.1.1 (pydicom-seg 0.4.1, which MONAI Label
# imports at start-up, fails on pydicom 3).
LOCK=(
  absl-py==2.5.1 aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 alembic==1.20.1 annotated-doc==0.0.7
  annotated-types==0.8.0 antlr4-python3-runtime==4.9.3 antspyx==0.6.3 anyio==4.16.0 attrs==26.1.0 bcrypt==5.0.0
  beautifulsoup4==4.15.0 blinker==1.9.0 cachetools==7.3.3 certifi==2026.10.19.post1 cffi==2.1.1
  charset-normalizer==3.5.3 click==8.5.1 cloudpickle==3.1.3 contourpy==1.3.3 cryptography==50.0.2 cycler==0.12.1
  databricks-sdk==0.162.0 dicomweb-client==0.59.3 diskcache==5.6.3 docker==7.2.0 einops==0.8.2 expiring-dict==1.1.2
  expiringdict==1.2.2 fastapi==0.165.0 filelock==4.3.1 fire==0.7.1 Flask==3.1.3 flask-cors==6.0.5 fonttools==4.68.0
  formulaic==1.2.2 frozenlist==1.8.0 fsspec==2026.9.0 gdown==6.5.1 girder-client==5.0.21 gitdb==4.0.12
  GitPython==3.2.1 google-auth==2.63.0 graphene==3.4.3 graphql-core==3.2.14 graphql-relay==3.2.0 grpcio==1.85.3
  gunicorn==26.2.0 h11==0.16.0 httpcore==1.0.9 httpx==0.28.1 huey==3.5.4 hydra-core==1.3.8 idna==3.20 ImageIO==2.38.1
  importlib_metadata==9.1.0 importlib_resources==7.1.0 interface_meta==2.0.1 iopath==0.1.10 itk==5.4.7
  itk-core==5.4.7 itk-filtering==5.4.7 itk-io==5.4.7 itk-numerics==5.4.7 itk-registration==5.4.7
  itk-segmentation==5.4.7 itsdangerous==2.2.0 Jinja2==3.1.6 joblib==1.6.0 jsonschema==3.2.0 kiwisolver==1.5.1
  lazy-loader==0.6 lmdb==3.0.0 Mako==1.4.3 Markdown==3.11.3 MarkupSafe==3.0.4 matplotlib==3.11.2 mlflow==3.17.2
  mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 monai==1.6.1 monailabel==0.8.5 mpmath==1.3.0 multidict==7.2.1
  narwhals==2.29.0 networkx==3.6.1 nibabel==5.4.2 ninja==1.13.2 numpy==1.26.4 numpymaxflow==0.0.7 omegaconf==2.3.1
  openslide-bin==4.0.1.2 openslide-python==1.4.7 opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 packaging==26.4 pandas==2.3.3 passlib==1.7.4
  patsy==1.0.3 pillow==13.0.0 portalocker==4.4.2 prettytable==3.18.0 propcache==0.5.4 protobuf==7.36.2 psutil==7.2.2
  pyarrow==25.0.1 pyasn1==0.6.5 pyasn1_modules==0.4.2 pycparser==3.12 pydantic==2.14.4 pydantic-settings==2.16.3
  pydantic_core==2.50.5 pydicom==2.4.4 pydicom-seg==0.4.1 PyJWT==2.15.1 pynetdicom==2.1.1 pynrrd==1.1.3
  pyparsing==3.3.3 pyrsistent==0.20.0 PySocks==1.7.1 python-dateutil==2.9.0.post0 python-dotenv==1.2.4
  python-multipart==0.0.34 pytorch-ignite==0.5.5 pytz==2026.6 PyYAML==6.0.4 requests==2.34.2 requests-toolbelt==1.0.0
  retrying==1.4.2 sam2==1.1.0 schedule==1.2.2 scikit-image==0.26.0 scikit-learn==1.9.1 scipy==1.15.3 shapely==2.2.0
  simpleitk==2.5.7 six==1.17.0 skops==0.16.0 smmap==5.0.3 sortedcontainers==2.4.0 soupsieve==4.1.3 SQLAlchemy==2.1.9
  sqlparse==0.6.1 starlette==1.10.0 statsmodels==0.15.0 sympy==1.14.0 tensorboard==2.21.0
  tensorboard-data-server==0.7.2 termcolor==3.3.0 threadpoolctl==3.8.0 tifffile==2026.3.3 timeloop==1.0.2
  torchvision==0.28.0 tqdm==4.70.1 typing-inspection==0.4.5 typing_extensions==4.16.0 tzdata==2026.6 urllib3==2.8.0
  uvicorn==0.54.0 watchdog==7.1.0 wcwidth==0.9.4 webcolors==25.10.0 Werkzeug==3.1.9 wrapt==2.5.2 yarl==1.25.1
  zipp==4.1.2
)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned exactly: any other torch request may pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "torch==2.13.0" "${LOCK[@]}"

# PyPI only has CUDA builds of torchvision. With the CPU torch build its C++ operators cannot load, and
# torchvision 0.28 then fails at import (it registers fake kernels for torchvision::nms and ::qnms without
# checking). MONAI Label imports torchvision only for make_grid / save_image (pure Python). The hook below runs
# once, when torchvision is first imported: if its C++ operators do not load, it declares those two operator
# schemas so the import succeeds; calling nms then still fails with torchvision's own clear error. Where the
# operators load (a CUDA torch), it does nothing.
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cat > "$site/drasclr_torchvision_cpu.py" <<'PY'
"""Let a CUDA build of torchvision import next to the CPU build of torch (written by tools/monailabel_env.sh)."""

import importlib.abc
import importlib.util
import sys

_LIBRARY = None  # keeps the operator declarations alive


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _declare_missing_operators()
        return None


def _declare_missing_operators():
    global _LIBRARY
    import glob
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    folder = os.path.dirname(spec.origin) if spec and spec.origin else None
    libraries = glob.glob(os.path.join(folder, "_C*.so")) if folder else []
    try:
        for library in libraries:
            torch.ops.load_library(library)
        return
    except (ImportError, OSError):
        pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def install():
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
PY
echo "import drasclr_torchvision_cpu; drasclr_torchvision_cpu.install()" > "$site/drasclr_torchvision_cpu.pth"

"$VENV/bin/python" - <<'PY'
import numpy, monai, monailabel, torch
from monailabel.transform.post import Restored  # noqa: F401  (imports torchvision)
assert numpy.__version__.startswith("1."), numpy.__version__
print(f"monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}, "
      f"numpy {numpy.__version__}")
PY
echo "$want" > "$stamp"
echo "$VENV/bin/python"
