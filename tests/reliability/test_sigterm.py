"""A SIGTERM (preemption, ``scancel``, ``docker stop``) sent to ``promptloop train`` at any moment: the step in
progress finishes, a checkpoint of it is written, the command exits with status 143 and names ``--resume``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from promptloop.rl.checkpoint import list_checkpoints, read_meta

REPO = Path(__file__).resolve().parents[2]


def test_promptloop_train_stops_cleanly_on_sigterm(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen(
        [sys.executable, "-m", "promptloop.cli", "train", "configs/miniworld_grpo.yaml", "--grpo.max_steps", "50",
         "--logging.output_dir", str(run), "--logging.report_to", "none", "--logging.checkpoint_every", "100",
         "--logging.eval_every", "0", "--logging.image_every", "0", "--logging.progress", "false",
         "--grpo.prompts_per_step", "1", "--grpo.group_size", "2", "--grpo.mini_batches", "1",
         "--grpo.micro_batch_size", "2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "training logged no step in 10 minutes"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # while the second step runs (or just after the first)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 143, output[-4000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    checkpoints = [read_meta(c)["step"] for c in list_checkpoints(run)]
    assert checkpoints == [steps[-1]] and 1 <= steps[-1] < 50, (checkpoints, steps)
    assert "stopped by SIGTERM at step" in output and "--resume" in output
    assert not (run / "policy").exists()
