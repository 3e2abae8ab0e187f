"""Run by tests/rl/test_trainer_distributed.py under `accelerate launch --multi_gpu --num_processes 2` on a CPU:
`promptloop train` itself (its checks, the derived sizes, the trainer's accelerator), with a stand-in trainer."""
import json
import sys
from pathlib import Path

from promptloop.cli import main
from promptloop.rl.trainer import GRPOTrainer, make_accelerator

out = Path(sys.argv[1])


class StandIn:
    """Records what the trainer would run with; trains nothing."""

    def __init__(self, config):
        self.accelerator = make_accelerator(config)
        self.step, self.terminated, self.run_dir = 0, False, out / "run"
        self.policy_dir = self.run_dir / "policy"

    def train(self, resume):
        rank = self.accelerator.process_index
        (out / f"cli_rank{rank}.json").write_text(json.dumps({
            "num_processes": self.accelerator.num_processes,
            "distributed_type": str(self.accelerator.distributed_type)}))


GRPOTrainer.from_config = classmethod(lambda cls, config, queries: StandIn(config))
sys.exit(main(["train", sys.argv[2], "--logging.output_dir", str(out / "run"), "--grpo.prompts_per_step", "2"]))
