"""Two CPU processes under `accelerate launch`: gradients of the LoRA parameters are synchronised.

On a machine without GPUs, `accelerate launch --multi_gpu --num_processes 2` starts two gloo processes through
torchrun (accelerate reports MULTI_CPU); `--cpu --num_processes 2` alone starts one process unless MPI is set up.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from promptloop.testing.tiny_vlm import save_tiny_vlm


def _launch_two_processes(script: str, *args: str, mixed_precision: str = "no") -> None:
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert launcher, "accelerate's launcher is a dependency of promptloop"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
         mixed_precision,
         "--dynamo_backend", "no", str(Path(__file__).with_name(script)), *args],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def test_the_train_command_forms_one_run_of_two_processes(tmp_path):
    """`promptloop train` under `accelerate launch --multi_gpu` on a CPU: one gloo run of two processes, not two
    independent runs (the command must not set up accelerate before asking for the CPU)."""
    config = tmp_path / "train.yaml"
    (tmp_path / "p.txt").write_text("a cat\n")
    config.write_text(f"backbone: {{name_or_path: x}}\ndata: {{prompts: {tmp_path / 'p.txt'}}}\n")
    _launch_two_processes("cli_processes.py", str(tmp_path), str(config))
    for rank in (0, 1):
        assert json.loads((tmp_path / f"cli_rank{rank}.json").read_text()) == {
            "num_processes": 2, "distributed_type": "DistributedType.MULTI_CPU"}


def test_two_processes_end_with_identical_adapters_and_distinct_seeds(tmp_path):
    vlm_dir = save_tiny_vlm(tmp_path / "vlm", "qwen2_5_vl")
    _launch_two_processes("ddp_train.py", str(tmp_path), str(vlm_dir))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert [r["steps"] for r in ranks] == [2, 2], "a stop asked on one process ends training on all at that step"
    # gloo DDP really wrapped the policy (accelerate falls back to MULTI_CPU on machines without GPUs)
    assert all(r["distributed_type"] == "DistributedType.MULTI_CPU" and r["prepared_class"] == "DistributedDataParallel"
               for r in ranks)
    a, b = (load_file(str(tmp_path / f"adapter_rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # B starts at zero: it moved
    assert set(sum(ranks[0]["seeds"], [])).isdisjoint(sum(ranks[1]["seeds"], []))
    # the warm-up advances once per optimizer step, as in one process (not once per process)
    base = 3e-2  # tiny_config's learning rate
    assert all(r["learning_rates"] == pytest.approx([base * 2 / 4, base * 3 / 4]) for r in ranks)
    # each step's logged reward is over both processes' trajectories, the same on both
    for step in range(2):
        pooled = ranks[0]["rewards"][step] + ranks[1]["rewards"][step]
        assert all(r["reward_means"][step] == pytest.approx(sum(pooled) / len(pooled)) for r in ranks)
    assert ranks[0]["rewards"] != ranks[1]["rewards"]


def _adapter(path: Path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_fsdp2_shards_the_policy_trains_as_ddp_and_resumes_exactly(tmp_path):
    """Under FSDP2 (accelerate's plugin, torch's fully_shard on two gloo processes) each process holds half of every
    LoRA tensor; rollouts, the update with the KL reference, evaluation with unequal shares, checkpoints and resumes
    (from its own checkpoint with gradient checkpointing on, from DDP's, and DDP from its) give DDP's results; bf16
    mixed precision trains with the on-policy check passing."""
    vlm_dir = save_tiny_vlm(tmp_path / "vlm", "qwen2_5_vl")

    def train(name, mode, resume_from=None, mixed_precision="no"):
        checkpoint = [str(tmp_path / resume_from / "run" / "checkpoints" / "step-00000002")] if resume_from else []
        _launch_two_processes("sharded_train.py", str(tmp_path / name), str(vlm_dir), mode, "3", *checkpoint,
                              mixed_precision=mixed_precision)
        return [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in (0, 1)]

    # "resumed" also recomputes activations in the backward (gradient checkpointing): the same numbers in fp32
    runs = {"ddp": train("ddp", "ddp"), "fsdp": train("fsdp", "fsdp"), "resumed": train("resumed", "fsdp+gc", "fsdp"),
            "from_ddp": train("from_ddp", "fsdp", "ddp"), "ddp_from_fsdp": train("ddp_from_fsdp", "ddp", "fsdp"),
            "bf16": train("bf16", "fsdp", mixed_precision="bf16")}
    for name in ("fsdp", "resumed", "from_ddp", "bf16"):
        for rank in runs[name]:
            assert rank["distributed_type"] == "DistributedType.FSDP" and rank["param_class"] == "DTensor"
            assert rank["halves"] and all(rank["halves"])  # each process holds half of every LoRA tensor
            # gathering the policy for sampling restores each module's own setting (accelerate's are mixed)
            assert rank["reshard_after"] == rank["reshard_before"] and len(set(rank["reshard_before"])) == 2
    assert all(r["prepared_class"] == "DistributedDataParallel" for r in runs["ddp"] + runs["ddp_from_fsdp"])
    ddp, fsdp = runs["ddp"][0], runs["fsdp"][0]
    assert fsdp["steps"] == ddp["steps"] == 3
    assert fsdp["reward_means"] == ddp["reward_means"] and fsdp["eval"] == ddp["eval"]
    assert fsdp["eval"][-1] is not None
    # the gathered adapter equals DDP's, in every checkpoint and the final policy
    for folder in ("checkpoints/step-00000002/policy", "checkpoints/step-00000003/policy", "policy"):
        assert _max_difference(_adapter(tmp_path / "fsdp" / "run" / folder),
                               _adapter(tmp_path / "ddp" / "run" / folder)) <= 1e-6
    final = _adapter(tmp_path / "fsdp" / "run" / "policy")
    assert any(float(v.abs().max()) > 0 for k, v in final.items() if "lora_B" in k)  # B starts at zero: it moved
    # resumed from step 2 (adapter and optimizer state restored, sharded or not): step 3 as in the uninterrupted run
    for name in ("resumed", "from_ddp", "ddp_from_fsdp"):
        assert runs[name][0]["reward_means"] == fsdp["reward_means"][2:], name
        assert _max_difference(_adapter(tmp_path / name / "run" / "policy"), final) <= 1e-6, name
    # bf16 mixed precision (FSDP2's MixedPrecisionPolicy, autocast): old log-probs recomputed, the ratio check passes
    bf16_steps = [json.loads(line) for line in (tmp_path / "bf16" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert runs["bf16"][0]["steps"] == 3 and all("policy/sampling_logprob_gap" in m for m in bf16_steps)
    assert bf16_steps[0]["losses/on_policy_ratio_deviation"] <= 1e-3
