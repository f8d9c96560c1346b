"""Downstream evaluation of subject embeddings (paper §4.2, Tables 2-8).

Algorithms: linear readouts with cross-validation (``readouts``), accuracy within one grade (``ordinal_metrics``),
Cox survival with time-dependent concordance (``survival``). The ``evaluate`` workflow (config
``bundle/configs/evaluate.yaml``) is made of components, one concept per module: the cohort and its paired feature
sets (``cohort``, ``feature_sets``: embedding tables, ``baselines``: LAA-950 and a random-init encoder), readout
targets (``targets``), the readout and survival analyses (``readout_analysis``, ``survival_analysis``), paper-style
tables and figures (``tables``, ``plots``), the MLflow run (``mlflow_logging``), the notes of skipped inputs
(``notes``) and the orchestration that runs them in order (``workflow``).
"""
