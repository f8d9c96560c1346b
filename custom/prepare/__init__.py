"""Preparation of CT scans for DrasCLR (paper section 2.1; DESIGN.md "Data flow").

One concept per module, in the order the data flows:
``io`` (load, orient, resample to 1 mm, check HU) -> ``lung_mask`` (classical segmentation, or the user's
mask) -> ``registration`` (affine, lung mask to atlas lung mask, antspyx) -> ``landmarks`` (atlas landmarks
mapped into the subject, QC) -> ``patches`` (32^3 int16 HU patches) -> ``cache`` (atomic per-subject entries
and the manifest). ``transforms`` makes these steps the scan pipeline of MONAI dictionary transforms that every
workflow reading CT shares; ``pipeline`` runs it for one subject; ``workflow`` for a cohort (inputs, workers,
resume, failure report).
``landmark_generator`` builds landmarks for a user's own atlas; ``phantom`` makes small CT volumes from the
atlas with a known affine, for tests and the registration benchmark; ``qc_figure`` draws a prepared subject.
The cache format is documented in ``cache`` and in ``bundle/docs/prepare.md``.
"""
