"""Do learned task relations reflect the tasks? Compare, on Yeast, the task correlations a
run's task regularisers learned with the correlations of the 14 labels in its training split.

    python benchmarks/task_relations_yeast.py RUN_DIR [RUN_DIR ...]

RUN_DIR: a ``polytask train`` run of ``configs/tabular/yeast.yaml`` (one task per label).
Prints the Pearson correlation over the 91 task pairs between the labels' correlation and:
for each ``task_covariance`` or ``clustered`` regulariser, the correlation it learned (the
last epoch's record in ``metrics.jsonl``); and, for every run, the correlation of Zhang and
Yeung's closed-form Omega computed from the heads' last weights (``checkpoints/last.pt``)
and the cosine similarity of those weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from polytask.config import load_config
from polytask.models.regularizers.task_covariance import optimal_task_covariance
from polytask.training.build import build_data


def label_correlation(run: Path, tasks: list[str]) -> np.ndarray:
    """The correlation matrix of the training split's labels, in the order of ``tasks``."""
    config = load_config(run / "config.yaml")
    bundle, _ = build_data(config)
    rows = [bundle.train[i]["targets"] for i in range(len(bundle.train))]
    labels = np.array([[float(r[t]) for t in tasks] for r in rows])
    return np.corrcoef(labels.T)


def _pearson(matrix: np.ndarray, labels: np.ndarray) -> float:
    pairs = np.triu_indices(len(labels), 1)
    return float(np.corrcoef(matrix[pairs], labels[pairs])[0, 1])


def from_heads(run: Path, tasks: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Omega's correlations and the cosine similarities of the heads' last weights."""
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
    w = torch.stack([state[f"heads.{t}.weight"].reshape(-1) for t in tasks], dim=1).double()
    omega = optimal_task_covariance(w, 1e-6)
    scale = omega.diagonal().sqrt()
    unit = torch.nn.functional.normalize(w, dim=0)
    return (omega / (scale[:, None] * scale[None, :])).numpy(), (unit.T @ unit).numpy()


def main(runs: list[str]) -> None:
    for name in runs:
        run = Path(name)
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        tasks = json.loads((run / "results.json").read_text())["tasks"]
        labels = label_correlation(run, tasks)
        regularizers = (last.get("architecture") or {}).get("regularizers", {})
        for key, state in regularizers.items():
            if "correlation" in state:
                corr = state["correlation"]
                learned = np.array([[corr[s][t] for t in tasks] for s in tasks])
                print(f"{run.name} {key} (learned): r = {_pearson(learned, labels):.3f}")
        omega, cosine = from_heads(run, tasks)
        print(f"{run.name} Omega from the heads' last weights: r = {_pearson(omega, labels):.3f}")
        print(f"{run.name} cosine of the heads' last weights: r = {_pearson(cosine, labels):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
