"""Loss and contrastive-accuracy curves of a pre-training run, read back from its MLflow store."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from custom.figures import save_figure  # noqa: E402

# The pictures of a pre-training: (metric names, y label, x label) per panel.
PRETRAINING_CURVES = (
    (("loss", "loss_local", "loss_neighbour"), "loss", "iteration"),
    (("acc_local", "acc_neighbour"), "contrastive top-1 accuracy", "iteration"),
)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window or window <= 1:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_training_curves(
    tracking_uri: str,
    out_file: str | Path,
    experiment_name: str = "drasclr_pretraining",
    title: str = "DrasCLR pre-training",
    run_id: str | None = None,
    panels=None,
) -> Path:
    """Plot a run's metric histories (raw and moving average): ``run_id``, or the latest run of
    ``experiment_name``. ``panels``: (metric names, y label, x label) per panel; default the pre-training's loss
    terms and top-1 accuracies per iteration."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if run_id is None:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            raise ValueError(f"no MLflow experiment {experiment_name!r} at {tracking_uri}")
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ValueError(f"experiment {experiment_name!r} has no runs")
        run_id = runs[0].info.run_id
    panels = PRETRAINING_CURVES if panels is None else panels
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (names, label, xlabel) in zip(axes[0], panels):
        for name in names:
            history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
            if not history:
                continue
            steps = np.array([m.step for m in history])
            values = np.array([m.value for m in history])
            window = max(1, len(values) // 20)
            (line,) = ax.plot(steps, values, alpha=0.25)
            ax.plot(steps[window - 1 :], _smooth(values, window), color=line.get_color(), label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_file, dpi=110)
