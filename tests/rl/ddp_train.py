"""Run by tests/rl/test_trainer_distributed.py under `accelerate launch --num_processes 2 --cpu`."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from promptloop.rl.callbacks import TrainerCallback  # noqa: E402
from trainer_helpers import adapter_state, tiny_trainer  # noqa: E402


class StopOnRankOne(TrainerCallback):
    """Asks to stop after step 2 on the second process only: both must stop there together."""

    def on_step_end(self, trainer, metrics):
        if trainer.step == 2 and trainer.accelerator.process_index == 1:
            trainer.should_stop = True


out, vlm_dir = Path(sys.argv[1]), Path(sys.argv[2])
trainer = tiny_trainer(out / "run", vlm_dir, max_steps=3, prompts_per_step=2, group_size=4, micro_batch_size=4,
                       warmup_steps=4)
trainer.callbacks.append(StopOnRankOne())
seeds, rewards = [], []
collect = trainer.collect


def recording_collect(queries, step):
    batch = collect(queries, step)
    seeds.append([t.seed for t in batch.trajectories])
    rewards.append(batch.rewards.tolist())
    return batch


trainer.collect = recording_collect
history = trainer.train()
rank = trainer.accelerator.process_index
save_file({k: v.contiguous() for k, v in adapter_state(trainer).items()}, str(out / f"adapter_rank{rank}.safetensors"))
(out / f"rank{rank}.json").write_text(json.dumps({"seeds": seeds, "world": trainer.accelerator.num_processes,
                                                  "steps": trainer.step,
                                                  "learning_rates": [h["train/lr"] for h in history],
                                                  "rewards": rewards,
                                                  "reward_means": [h["reward/mean"] for h in history],
                                                  "torch_threads": torch.get_num_threads(),
                                                  "distributed_type": str(trainer.accelerator.distributed_type),
                                                  "prepared_class": type(trainer.model).__name__}))
