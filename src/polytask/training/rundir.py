"""Run directories: one per training run, never overwritten.

Layout::

    RUN_DIR/
      config.yaml        the resolved configuration (what was actually run)
      meta.json          versions, command, start time
      train.log          the log
      metrics.jsonl      one JSON record per epoch (train losses, weights, val/test metrics)
      checkpoints/       last.pt (resume), best.pt (selected weights)
      results.json       final results (written once training has finished)
      inspection.npz     what the architecture shows on a few validation samples (at the end)
      report.md, report.html, plots/  human-readable reports
      tensorboard/       optional TensorBoard events
"""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from .._meta import package_version
from ..errors import ConfigError
from ..yamlio import load_bytes, show_path

__all__ = ["RunDirectory", "new_run_path"]


def new_run_path(output_dir: str | Path, name: str) -> Path:
    """A fresh directory path ``OUTPUT_DIR/NAME-YYYYmmdd-HHMMSS[-k]`` that does not exist yet."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{name}-{stamp}"
    path, k = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{k}")
        k += 1
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class RunDirectory:
    """Paths and writers of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- paths ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoint_dir / "best.pt"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def inspection_path(self) -> Path:
        return self.path / "inspection.npz"

    # -- lifecycle -----------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: Mapping[str, Any]) -> RunDirectory:
        """Create a new run directory; an existing non-empty directory is never reused."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise ConfigError(
                f"run directory {path} already exists and is not empty; runs are never "
                "overwritten. Use `polytask resume` to continue it, or choose another directory."
            )
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
        meta = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "polytask": package_version(),
        }
        (path / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        """An existing run directory (it must contain ``config.yaml``)."""
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise ConfigError(
                f"{path} is not a polytask run directory (no config.yaml found there)."
            )
        return cls(path)

    def read_config(self) -> dict[str, Any]:
        raw = self.config_path.read_bytes()
        data = load_bytes(raw, f"{show_path(self.config_path)} (damaged)")
        if not isinstance(data, dict):
            raise ConfigError(f"{self.config_path} does not hold a configuration mapping.")
        return data

    # -- records -------------------------------------------------------------------------
    def append_metrics(self, record: Mapping[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(_json_safe(record)) + "\n")

    def truncate_metrics(self, epochs_done: int) -> None:
        """Drop records of epochs after ``epochs_done`` (written after the checkpoint resumed from)."""
        if not self.metrics_path.exists():
            return
        kept = [r for r in self.read_metrics() if int(r.get("epoch", -1)) < epochs_done]
        text = "".join(json.dumps(_json_safe(r)) + "\n" for r in kept)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.metrics_path)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
        return records

    def write_results(self, results: Mapping[str, Any]) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_json_safe(results), indent=2), encoding="utf-8")
        tmp.replace(self.results_path)

    def read_results(self) -> dict[str, Any] | None:
        if not self.results_path.exists():
            return None
        try:
            data = json.loads(self.results_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{self.results_path} is damaged, not valid JSON ({exc}); remove it and run "
                "`polytask resume` to evaluate the run again."
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.results_path} is damaged: expected a JSON object.")
        return data

    def write_inspection(self, arrays: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Write ``inspection.npz``: the tensors (as float32 NumPy arrays, float16 for those
        of more than a million values) and ``meta`` as JSON under the key ``meta``."""
        data: dict[str, Any] = {}
        for key, tensor in arrays.items():
            value = tensor.detach().cpu().float()
            data[key] = value.half().numpy() if value.numel() > 1_000_000 else value.numpy()
        data["meta"] = np.array(json.dumps(dict(meta)))
        tmp = self.inspection_path.with_name(".inspection.tmp.npz")
        np.savez_compressed(tmp, **data)
        tmp.replace(self.inspection_path)

    def read_inspection(self) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, Any]] | None:
        """The arrays and the meta data of ``inspection.npz``; ``None`` without one."""
        if not self.inspection_path.is_file():
            return None
        with np.load(self.inspection_path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        meta = json.loads(str(arrays.pop("meta"))) if "meta" in arrays else {}
        return {k: v.astype(np.float32) for k, v in arrays.items()}, meta

    def logger(self, console: bool = True) -> logging.Logger:
        """A logger writing to ``train.log`` (and to stderr when ``console``)."""
        log = logging.getLogger(f"polytask.run.{self.path.resolve()}")
        log.setLevel(logging.INFO)
        log.propagate = False
        if not log.handlers:
            fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
            fh = logging.FileHandler(self.path / "train.log", encoding="utf-8")
            fh.setFormatter(fmt)
            log.addHandler(fh)
            if console:
                sh = logging.StreamHandler(sys.stderr)
                sh.setFormatter(logging.Formatter("%(message)s"))
                log.addHandler(sh)
        return log

    def close_logger(self) -> None:
        log = logging.getLogger(f"polytask.run.{self.path.resolve()}")
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)
