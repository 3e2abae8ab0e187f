"""Fork server of the kill -9 trials (run as a script by kill_harness.py).

Importing torch, diffusers and transformers takes most of a tiny training run's time, so this process imports them
once and forks one real training process per request: every trial still kills a separate process with SIGKILL
while it trains or writes a checkpoint. The server itself never computes (torch's thread pools start in the
children), which keeps forking safe.

Protocol, one JSON object per line: the server prints {"ready": pid}; for each request read from stdin it prints
{"pid": child} at once and {"pid": child, "signal": ..., "exit": ...} when the child ends. Children write their
progress to the request's events file ("<monotonic time> <event> <step>" lines) and their output to stderr.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rl"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from promptloop.rewards import Reward  # noqa: E402
from promptloop.rl.checkpoint import latest_checkpoint  # noqa: E402
from trainer_helpers import adapter_state, tiny_trainer  # noqa: E402


class PromptHashReward(Reward):
    """A deterministic score spread over [0, 1) by the final prompt's CRC32: every group carries a learning signal,
    so the adapters the trials compare really move."""

    name = "prompt_hash"

    def score_batch(self, images, queries, metadata):
        return torch.tensor([zlib.crc32(m["prompt"].encode()) % 1000 / 1000 for m in metadata])


def _logger(path: str):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(event: str, step: int) -> None:
        os.write(fd, f"{time.monotonic():.6f} {event} {step}\n".encode())  # one write: visible at once, whole

    return log


def _save_adapter(trainer, path: str) -> None:
    save_file({k: v.contiguous() for k, v in adapter_state(trainer).items()}, path)


def train_once(request: dict) -> None:
    """One training process: a fresh run, or a resumed one (``resume``), recording its progress as events."""
    log = _logger(request["events"])
    trainer = tiny_trainer(Path(request["run_dir"]), Path(request["vlm_dir"]), reward=PromptHashReward(),
                           **request["grpo"])
    trainer.config.logging.checkpoint_every = request["checkpoint_every"]
    if request.get("initial_out"):
        _save_adapter(trainer, request["initial_out"])
    collect, update, save = trainer.collect, trainer.update, trainer.save_checkpoint

    def logged_collect(queries, step):
        log("begin", step + 1)
        return collect(queries, step)

    def logged_update(batch):
        metrics = update(batch)
        log("done", trainer.step + 1)
        return metrics

    def logged_save():
        log("saving", trainer.step)
        path = save()
        log("saved", trainer.step)
        return path

    trainer.collect, trainer.update, trainer.save_checkpoint = logged_collect, logged_update, logged_save
    resume = request["resume"] and latest_checkpoint(Path(request["run_dir"])) is not None
    log("start", trainer.step)
    trainer.train(resume=resume)
    _save_adapter(trainer, request["adapter_out"])
    log("finished", trainer.step)


def serve() -> None:
    torch.set_num_threads(1)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.dup2(2, 1)  # the child's prints must not mix into the protocol on stdout
                train_once(request)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)


if __name__ == "__main__":
    serve()
