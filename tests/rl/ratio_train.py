"""Run by tests/rl/test_trainer_distributed.py under `accelerate launch --multi_gpu --num_processes 2` on a CPU:
the second process's sampling log-probs are shifted, so only its on-policy ratio check fails."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from promptloop.rl.trainer import RatioCheckError  # noqa: E402
from trainer_helpers import tiny_trainer  # noqa: E402

out, vlm_dir = Path(sys.argv[1]), Path(sys.argv[2])
trainer = tiny_trainer(out / "run", vlm_dir, max_steps=2, prompts_per_step=2, group_size=4, micro_batch_size=4)
trainer.config.grpo.old_logprobs = "sampling"
rank = trainer.accelerator.process_index
collect = trainer.collect


def shifted_on_rank_one(queries, step):
    batch = collect(queries, step)
    if rank == 1:
        for action in batch.actions:
            action.sampling_logps = action.sampling_logps + 0.01
    return batch


trainer.collect = shifted_on_rank_one
try:
    trainer.train()
    message = None
except RatioCheckError as e:
    message = str(e)
(out / f"ratio_rank{rank}.json").write_text(json.dumps({"error": message, "step": trainer.step}))
