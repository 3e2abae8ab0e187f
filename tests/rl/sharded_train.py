"""Run by tests/rl/test_trainer_distributed.py under `accelerate launch --multi_gpu --num_processes 2` on a CPU:
`sharded_train.py OUT VLM_DIR ddp|fsdp[+gc] MAX_STEPS [CHECKPOINT]` trains the tiny policy (+gc: with gradient
checkpointing; resuming from CHECKPOINT).

accelerate turns FSDP on for GPU process types only; with `fsdp` this script puts accelerate's FSDP2 plugin on the
gloo processes (as `fsdp_version: 2` would on GPUs), so `accelerator.prepare` shards the policy with torch's
`fully_shard`, which runs on CPUs.
"""
import json
import sys
from pathlib import Path

import accelerate.state
import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

sys.path.insert(0, str(Path(__file__).parent))
from promptloop.backbones import auto_backbone  # noqa: E402
from promptloop.rl.sharding import reshard_settings  # noqa: E402
from promptloop.rl.trainer import GRPOTrainer  # noqa: E402
from promptloop.testing.tiny_pipelines import tiny_sd_pipeline  # noqa: E402
from trainer_helpers import QUERIES, LowercaseStartReward, tiny_config, tiny_policy  # noqa: E402

out, vlm_dir, max_steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[4])
mode, _, option = sys.argv[3].partition("+")
checkpoint = Path(sys.argv[5]) if len(sys.argv) > 5 else None

if mode == "fsdp":
    init = accelerate.state.AcceleratorState.__init__

    def init_with_fsdp2(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="SHARDED_STATE_DICT")

    accelerate.state.AcceleratorState.__init__ = init_with_fsdp2

config = tiny_config(out / "run", vlm_dir, max_steps=max_steps, prompts_per_step=2, group_size=4, micro_batch_size=4,
                     beta=0.04)  # the reference policy (adapter off) runs too
# rollouts in chunks of 2; 5 held-out queries: the processes evaluate 3 and 2, in 2 and 1 chunks
config.backbone.rollout_batch_size, config.logging.eval_every = 2, 3
torch.manual_seed(config.grpo.seed)
trainer = GRPOTrainer(config, tiny_policy(vlm_dir, gradient_checkpointing=option == "gc"), auto_backbone(tiny_sd_pipeline(seed=0)), LowercaseStartReward(),
                      QUERIES, eval_queries=["Pink moon", "A tall house", "Blue sky", "Old car", "Rain"])
if mode == "fsdp":  # each FSDP module's resharding after forward, as accelerate set it (root initialised first)
    trainer.model._get_fsdp_state()._lazy_init()
reshard_before = reshard_settings(trainer.model)
history = trainer.train(resume=checkpoint or False)
rank = trainer.accelerator.process_index
lora = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
(out / f"rank{rank}.json").write_text(json.dumps({
    "distributed_type": str(trainer.accelerator.distributed_type),
    "prepared_class": type(trainer.model).__name__,
    "param_class": type(next(iter(lora.values()))).__name__,
    "halves": [p.to_local().numel() * 2 == p.numel() for p in lora.values() if hasattr(p, "to_local")],
    "reshard_before": reshard_before,
    "reshard_after": reshard_settings(trainer.model),
    "steps": trainer.step,
    "reward_means": [h["reward/mean"] for h in history],
    "eval": [h.get("eval/reward_mean") for h in history],
}))
