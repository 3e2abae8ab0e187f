"""Run by tests/eval/test_eval_distributed.py under `accelerate launch --multi_gpu --num_processes 2`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from eval_helpers import register_test_reward  # noqa: E402

from promptloop.cli import main  # noqa: E402
from promptloop.processes import process_state  # noqa: E402

register_test_reward()
code = main(["eval", *sys.argv[1:]])
state = process_state()
print(f"process {state.process_index} of {state.num_processes} done", flush=True)
sys.exit(code)
