"""`promptloop eval` under `accelerate launch` with two CPU processes: each takes every other batch, and the results
equal one process's (same images, prompts and scores; only the timings differ)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from eval_helpers import one_per_batch_config, samples_without_timings


def test_two_processes_give_one_processs_results(tmp_path, tiny_backbone_dir, tiny_policy_dir):
    config = one_per_batch_config(tmp_path, tiny_backbone_dir, {
        "base": {"kind": "base"},
        "closed": {"kind": "closed", "policy": str(tiny_policy_dir), "num_refinements": [1]},
        "apriori": {"kind": "apriori", "policy": str(tiny_policy_dir), "num_refinements": [2]}}, "overridden")
    script = str(Path(__file__).with_name("eval_ddp.py"))
    # both runs one thread per process, so that float reductions (and so pixels) agree bit for bit
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    single = subprocess.run([sys.executable, script, str(config), "--output.output_dir", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-4000:]
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    result = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", script, str(config), "--output.output_dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "process 0 of 2 done" in result.stdout and "process 1 of 2 done" in result.stdout
    assert "process 0 of 1 done" in single.stdout

    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert len(one["samples"]) == 3 * 3 * 2  # prompts x methods x seeds
    assert samples_without_timings(two) == samples_without_timings(one)
    for sample in one["samples"]:
        a, b = (np.asarray(Image.open(tmp_path / name / sample["image"])) for name in ("one", "two"))
        assert np.array_equal(a, b), sample["image"]
    assert (tmp_path / "two" / "report.html").is_file() and (tmp_path / "two" / "results.md").is_file()
    assert not (tmp_path / "two" / ".progress").exists()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
