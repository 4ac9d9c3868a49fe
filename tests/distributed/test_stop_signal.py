"""A stop signal under torchrun: SIGTERM to the launcher (which forwards it to every
process), or to one process only, stops every process at the same step; rank 0 writes the
checkpoint, every process exits with 143 as one process does, and ``polytask resume``
continues to the result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_data_parallel import assert_same_state, config

from polytask.api import resume, train
from polytask.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

RUNNER = Path(__file__).with_name("signal_runner.py")
#: the global step after which the signal is sent (4 steps an epoch, 2 epochs)
SIGNAL_AT = 2


def stop_under_torchrun(tmp_path: Path, who: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(config(tmp_path)), encoding="utf-8")
    run_dir, out = tmp_path / "run", tmp_path / "exits"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLYTASK_DIST_TIMEOUT_S": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", str(RUNNER), who, str(SIGNAL_AT), str(out)]
    cmd += ["train", str(path), "--quiet", "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return done, run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    train(config(folder), run_dir=folder / "run", console=False)
    return folder / "run"


@pytest.mark.parametrize("who", ["launcher", "rank1"])
def test_signal_stops_every_process_and_resumes(
    tmp_path: Path, uninterrupted: Path, who: str
) -> None:
    done, run_dir = stop_under_torchrun(tmp_path, who)
    exits = {p.name: p.read_text().split() for p in (tmp_path / "exits").iterdir()}
    # every process returned 143 (128 + SIGTERM) after the same step
    assert exits == {"rank-0": ["143", str(SIGNAL_AT)], "rank-1": ["143", str(SIGNAL_AT)]}, (
        done.stderr[-3000:]
    )
    assert done.returncode != 0  # torchrun reports a job whose processes exited non-zero
    assert f"polytask: stopped by SIGTERM; `polytask resume {run_dir}`" in done.stderr
    # rank 0 wrote the checkpoint at the stop (the run had none yet)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["global_step"] == SIGNAL_AT
    resume(run_dir, console=False)
    assert_same_state(uninterrupted, run_dir)
