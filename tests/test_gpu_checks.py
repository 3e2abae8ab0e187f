"""``benchmarks/gpu_checks.sh --cpu``: the prepared GPU checks run end to end at tiny scale on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_checks_dry_run_writes_every_steps_results(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable)
    command = ["bash", "benchmarks/gpu_checks.sh", "--cpu", "train", "overhead", "decode", "vllm"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = (tmp_path / "steps.txt").read_text().splitlines()
    assert [line.split()[:2] for line in steps] == [
        ["train", "rc=0"], ["overhead", "rc=0"], ["decode", "rc=0"], ["vllm", "skipped"]], \
        (tmp_path / "log.txt").read_text()[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["losses/on_policy_ratio_deviation"] < 1e-5  # fp32 on the CPU
    overhead = json.loads((tmp_path / "overhead.json").read_text())
    assert [(r["mode"], r["n_r"]) for r in overhead["results"]] == [
        ("plain", 0), ("closed", 3), ("apriori", 3), ("closed", 1), ("apriori", 1)]
    decode = json.loads((tmp_path / "policy_decode.json").read_text())["results"]
    assert {"plain", "static_cache", "policy_act_b8_448px", "policy_act_b8_448px_static_cache"} <= set(decode)
