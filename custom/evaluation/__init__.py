"""Downstream evaluation of subject embeddings (paper §4.2, Tables 2-8).

Linear readouts with cross-validation (``readouts``), accuracy within one grade (``ordinal_metrics``), Cox
survival with time-dependent concordance (``survival``), the feature sets compared (``feature_sets``: embedding
tables, LAA-950, a random-init encoder), paper-style tables and plots, and the ``evaluate`` workflow that runs
them all and logs to MLflow (``workflow``; config ``bundle/configs/evaluate.yaml``).
"""
