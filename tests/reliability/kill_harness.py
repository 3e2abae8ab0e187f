"""kill -9 trials: train in a forked process, SIGKILL it at a random moment, check the last checkpoint, resume.

The parent reads the child's progress events to place the kill and to measure the work lost; see
training_forkserver.py for the processes themselves.
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file

from fault_helpers import load_whole_checkpoint, max_difference
from promptloop.rl.checkpoint import latest_checkpoint

WORKER = Path(__file__).with_name("training_forkserver.py")
GRPO = dict(max_steps=6, prompts_per_step=1, group_size=2, micro_batch_size=2)
CHECKPOINT_EVERY = 2
"""Six steps, a checkpoint every two: a kill may cost at most two steps of work."""


class TrainingForkServer:
    """The fork server process; ``run`` / ``start`` + ``wait`` drive one training process per call."""

    def __init__(self, log_path: Path, vlm_dir: Path, startup_timeout: float = 300.0):
        self.vlm_dir = vlm_dir
        self.log_path = log_path
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self._log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
        self._messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._next(startup_timeout)

    def _read(self) -> None:
        for line in self.process.stdout:
            self._messages.put(json.loads(line))

    def _next(self, timeout: float) -> dict:
        try:
            return self._messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"fork server silent for {timeout} s; its log:\n{self.log_tail()}") from None

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-chars:]

    def start(self, run_dir: Path, events: Path, adapter_out: Path, resume: bool,
              initial_out: Optional[Path] = None) -> int:
        request = dict(run_dir=str(run_dir), vlm_dir=str(self.vlm_dir), events=str(events), resume=resume,
                       adapter_out=str(adapter_out), initial_out=str(initial_out) if initial_out else None,
                       grpo=GRPO, checkpoint_every=CHECKPOINT_EVERY)
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._next(60.0)["pid"]

    def wait(self, timeout: float = 300.0) -> dict:
        return self._next(timeout)

    def run(self, *args, timeout: float = 300.0, **kwargs) -> dict:
        """Start a training process and wait for it; it must finish cleanly."""
        self.start(*args, **kwargs)
        status = self.wait(timeout)
        if status["exit"] != 0:
            raise RuntimeError(f"training process ended with {status}; log:\n{self.log_tail()}")
        return status

    def close(self) -> None:
        self.process.stdin.close()
        self.process.terminate()  # nothing left to finish: skip the interpreter's slow teardown
        self.process.wait(timeout=30)
        self._log.close()


def read_events(path: Path) -> list[tuple[float, str, int]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        t, name, step = line.split()
        events.append((float(t), name, int(step)))
    return events


def _wait_for(path: Path, name: str, step: Optional[int], timeout: float) -> bool:
    """Poll the events file (1 ms) until ``name`` (at ``step``) appears; False if it did not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e[1] == name and (step is None or e[2] == step) for e in read_events(path)):
            return True
        time.sleep(0.001)
    return False


@dataclass
class Reference:
    """The uninterrupted run every trial must reproduce."""

    adapter: dict
    initial_adapter: dict
    train_seconds: float
    """From the start of training to its end."""
    save_seconds: float
    """Mean duration of one checkpoint write."""


def reference_run(server: TrainingForkServer, root: Path) -> Reference:
    root.mkdir(parents=True, exist_ok=True)
    events = root / "events.log"
    server.run(root / "run", events, root / "final.safetensors", resume=False, initial_out=root / "initial.safetensors")
    ev = read_events(events)
    start = next(t for t, n, _ in ev if n == "start")
    end = next(t for t, n, _ in ev if n == "finished")
    saving = {s: t for t, n, s in ev if n == "saving"}
    saves = [t - saving[s] for t, n, s in ev if n == "saved"]
    return Reference(load_file(str(root / "final.safetensors")), load_file(str(root / "initial.safetensors")),
                     end - start, sum(saves) / len(saves))


@dataclass
class TrialOutcome:
    target: str
    """Where the kill was aimed: "anytime" (uniform over the training time) or "checkpoint write"."""
    killed: bool
    phase: str
    """What the process was doing when killed, from its last event: "before step 1", "step N", "writing
    checkpoint N"."""
    steps_done: int
    checkpoint_step: int
    """Step of the latest complete checkpoint after the kill (0: none)."""
    lost_steps: int
    leftover_temporary: bool
    """The kill left a temporary folder (ignored by resume, removed by the next save)."""
    temporary_after_resume: bool
    final_difference: float
    """Largest |resumed adapter - uninterrupted adapter|."""
    seconds: float


def _phase(events: list[tuple[float, str, int]], kill_time: float) -> str:
    before = [e for e in events if e[0] <= kill_time and e[1] in ("begin", "saving", "saved", "done")]
    if not before:
        return "before step 1"
    _, name, step = before[-1]
    if name == "saving":
        return f"writing checkpoint {step}"
    return f"step {step}" if name == "begin" else f"after step {step}"


def kill_trial(server: TrainingForkServer, root: Path, reference: Reference, rng: random.Random,
               target: str) -> TrialOutcome:
    """Train, SIGKILL at a random moment (``target``), verify the latest checkpoint, resume to the end."""
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    run_dir, events = root / "run", root / "events.log"
    pid = server.start(run_dir, events, root / "unused.safetensors", resume=False)
    if target == "checkpoint write":
        # Not the last checkpoint: after it the run may finish before the kill lands.
        step = rng.choice(range(CHECKPOINT_EVERY, GRPO["max_steps"], CHECKPOINT_EVERY))
        _wait_for(events, "saving", step, timeout=120)
        time.sleep(rng.uniform(0, reference.save_seconds))
    else:
        _wait_for(events, "start", None, timeout=120)
        time.sleep(rng.uniform(0, 0.95 * reference.train_seconds))
    kill_time = time.monotonic()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # already finished and reaped
        pass
    status = server.wait()
    killed = status["signal"] == signal.SIGKILL
    before = read_events(events)
    done = [s for _, n, s in before if n == "done"]
    saved = [s for _, n, s in before if n == "saved"]
    latest = latest_checkpoint(run_dir)
    checkpoint_step = load_whole_checkpoint(latest)["step"] if latest else 0
    assert checkpoint_step >= max(saved, default=0), "a checkpoint reported as saved is missing"
    leftover = any(p.name.startswith(".tmp") for p in (run_dir / "checkpoints").glob("*"))

    resumed_events = root / "resumed_events.log"
    server.run(run_dir, resumed_events, root / "final.safetensors", resume=True)
    final = load_file(str(root / "final.safetensors"))
    # No "begin" event: the first run had finished, so the resumed one had no step left.
    resumed_from = next((s - 1 for _, n, s in read_events(resumed_events) if n == "begin"), GRPO["max_steps"])
    assert resumed_from == checkpoint_step, (resumed_from, checkpoint_step)
    return TrialOutcome(
        target=target, killed=killed, phase=_phase(before, kill_time), steps_done=max(done, default=0),
        checkpoint_step=checkpoint_step, lost_steps=max(done, default=0) - checkpoint_step,
        leftover_temporary=leftover,
        temporary_after_resume=any(p.name.startswith(".tmp") for p in (run_dir / "checkpoints").glob("*")),
        final_difference=max_difference(final, reference.adapter), seconds=time.monotonic() - t0,
    )


def summarise(outcomes: list[TrialOutcome], seed: int) -> dict:
    killed = [o for o in outcomes if o.killed]
    return {
        "seed": seed, "trials": len(outcomes), "killed": len(killed),
        "killed_while_writing_checkpoint": sum(o.phase.startswith("writing") for o in killed),
        "identical_after_resume": sum(o.final_difference <= 1e-6 for o in outcomes),
        "max_final_difference": max(o.final_difference for o in outcomes),
        "mean_lost_steps": sum(o.lost_steps for o in killed) / max(len(killed), 1),
        "max_lost_steps": max((o.lost_steps for o in killed), default=0),
        "left_temporary_folder": sum(o.leftover_temporary for o in killed),
        "mean_trial_seconds": sum(o.seconds for o in outcomes) / len(outcomes),
        "outcomes": [asdict(o) for o in outcomes],
    }
