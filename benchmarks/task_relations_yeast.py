"""Do learned task relations reflect the tasks? Compare, on Yeast, the task correlations a
run's task regularisers learned with the correlations of the 14 labels in its training split.

    python benchmarks/task_relations_yeast.py RUN_DIR [RUN_DIR ...]

RUN_DIR: a ``polytask train`` run of ``configs/tabular/yeast.yaml`` (one task per label)
with ``model.regularizers`` holding ``task_covariance`` and/or ``clustered``. Prints, per run
and regulariser, the Pearson correlation over the 91 task pairs between the learned
correlation (the last epoch's record in ``metrics.jsonl``) and the labels' correlation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from polytask.config import load_config
from polytask.training.build import build_data


def label_correlation(run: Path, tasks: list[str]) -> np.ndarray:
    """The correlation matrix of the training split's labels, in the order of ``tasks``."""
    config = load_config(run / "config.yaml")
    bundle, _ = build_data(config)
    rows = [bundle.train[i]["targets"] for i in range(len(bundle.train))]
    labels = np.array([[float(r[t]) for t in tasks] for r in rows])
    return np.corrcoef(labels.T)


def main(runs: list[str]) -> None:
    for name in runs:
        run = Path(name)
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        regularizers = last["architecture"]["regularizers"]
        for key, state in regularizers.items():
            if "correlation" not in state:
                continue
            tasks = list(state["correlation"])
            learned = np.array([[state["correlation"][s][t] for t in tasks] for s in tasks])
            labels = label_correlation(run, tasks)
            pairs = np.triu_indices(len(tasks), 1)
            r = np.corrcoef(learned[pairs], labels[pairs])[0, 1]
            print(f"{run.name} {key}: Pearson r over {len(pairs[0])} task pairs = {r:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
