"""A stop signal under torchrun: SIGTERM to the launcher, which forwards it to every
process, stops every process after the same step; rank 0 writes the checkpoint and every process
exits with 143 as one process does. (A signal to one process only, and the resume of the
stopped run: ``test_data_parallel.py``.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_parallel import SIGNAL_AT, config

from polytask.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

RUNNER = Path(__file__).with_name("signal_runner.py")


def stop_under_torchrun(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(config(tmp_path)), encoding="utf-8")
    run_dir, out = tmp_path / "run", tmp_path / "exits"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLYTASK_DIST_TIMEOUT_S": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", str(RUNNER), "launcher", str(SIGNAL_AT), str(out)]
    cmd += ["train", str(path), "--quiet", "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return done, run_dir


def test_signal_to_the_launcher_stops_every_process(tmp_path: Path) -> None:
    """As a scheduler stops a job: SIGTERM to torchrun, forwarded to both processes."""
    done, run_dir = stop_under_torchrun(tmp_path)
    exits = {p.name: p.read_text().split() for p in (tmp_path / "exits").iterdir()}
    # every process returned 143 (128 + SIGTERM) after the same step
    assert exits == {"rank-0": ["143", str(SIGNAL_AT)], "rank-1": ["143", str(SIGNAL_AT)]}, (
        done.stderr[-3000:]
    )
    assert done.returncode != 0  # torchrun's own status after the signal it received
    assert f"polytask: stopped by SIGTERM; `polytask resume {run_dir}`" in done.stderr
    # rank 0 wrote the checkpoint at the stop (the run had none yet); that resume from such
    # a checkpoint ends as the uninterrupted run is tested in test_data_parallel.py
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["global_step"] == SIGNAL_AT
