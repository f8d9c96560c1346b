"""The ``detection`` workflow (``bundle/configs/emphysema_finetune.yaml``, run id ``detection``): emphysema
detection on annotated boxes (paper §4.3.1, Table 5), the label-efficiency curve (§4.3.2, Fig. 5) and the
sensitivity to the routing location (§4.4, Table 7).

It runs its components in order: the cross-validation (``custom.emphysema.cross_validation``: fold splitter,
experiments, one binary detector per subtype trained by the linear-readout, fine-tuning and Patch-LAA
(``custom.emphysema.patch_laa``) runners, the detection rule of ``custom.emphysema.detection_rule``) and then
every writer (``custom.emphysema.detection_writers``) into ``output_dir``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from custom.emphysema.cross_validation import DetectionCrossValidation

logger = logging.getLogger(__name__)


class DetectionEvaluation:
    """``cross_validation.run()``, then each of ``writers`` into ``output_dir`` with ``note`` (a caption above the
    tables and on the figure; the demo's says the data are synthetic)."""

    def __init__(
        self, cross_validation: DetectionCrossValidation, writers: Sequence, output_dir: str | Path, note: str = ""
    ):
        self.cross_validation, self.writers = cross_validation, list(writers or [])
        self.output_dir, self.note = Path(output_dir), note or ""

    def run(self) -> dict:
        """Returns the results (box predictions, per-fold metrics), the paths written and the seconds taken."""
        start = time.perf_counter()
        results = self.cross_validation.run()
        paths = {}
        for writer in self.writers:
            paths.update(writer.write(results, self.output_dir, self.note))
        seconds = time.perf_counter() - start
        logger.info("detection evaluation done in %.0f s; outputs in %s", seconds, self.output_dir)
        return {"results": results, "paths": paths, "seconds": seconds}
