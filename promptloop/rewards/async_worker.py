"""Score batches in a background thread so sampling continues while rewards compute."""
from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any, Hashable

import torch

from .base import Images, Metadata, Reward, RewardOutput, check_batch


class RewardWorkerError(RuntimeError):
    """A batch failed inside the reward worker; ``batch_id`` names it and ``__cause__`` is the original error."""

    def __init__(self, batch_id: Hashable, cause: BaseException):
        super().__init__(f"Reward batch {batch_id!r} failed: {type(cause).__name__}: {cause}")
        self.batch_id = batch_id


@dataclass
class RewardJob:
    """A submitted batch. ``result()`` blocks until its scores are ready.

    Attributes:
        batch_id: the id given at submit time (or a running counter).
        timeout: default seconds ``result()`` waits (None = forever).
    """

    batch_id: Hashable
    future: Future
    timeout: float | None = None

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> RewardOutput:
        """The batch's ``RewardOutput``; raises ``RewardWorkerError`` if scoring failed, ``TimeoutError`` if it is
        not done after ``timeout`` seconds (default: the job's timeout)."""
        timeout = self.timeout if timeout is None else timeout
        try:
            return self.future.result(timeout=timeout)
        except FutureTimeoutError as exc:
            raise TimeoutError(f"Reward batch {self.batch_id!r} not done after {timeout} s.") from exc
        except Exception as exc:
            raise RewardWorkerError(self.batch_id, exc) from exc


class AsyncRewardWorker:
    """Runs ``reward`` on submitted batches in background threads (one by default: a model is not shared between
    concurrent calls).

    Inputs are checked at ``submit`` (wrong types fail at once); tensor images are cloned so the caller may reuse
    its buffers.
    """

    def __init__(self, reward: Reward, max_workers: int = 1, timeout: float | None = None):
        self.reward = reward
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")
        self._ids = itertools.count()

    def submit(self, images: Images, queries: list[str], metadata: Metadata = None,
               batch_id: Hashable | None = None, timeout: float | None = None) -> RewardJob:
        """Queue one batch; returns at once. ``timeout`` overrides the worker's default wait for this job."""
        check_batch(images, queries, metadata)
        images = images.detach().clone() if isinstance(images, torch.Tensor) else list(images)
        args: tuple[Any, ...] = (images, list(queries), None if metadata is None else list(metadata))
        batch_id = next(self._ids) if batch_id is None else batch_id
        return RewardJob(batch_id, self._executor.submit(self.reward, *args),
                         self.timeout if timeout is None else timeout)

    def close(self, wait: bool = True) -> None:
        """Stop accepting batches; with ``wait``, finish the queued ones first."""
        self._executor.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> "AsyncRewardWorker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
