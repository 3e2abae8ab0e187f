"""The background reward worker: same scores as a direct call; errors and timeouts name their batch."""
import threading

import pytest
import torch

from promptloop.rewards import AsyncRewardWorker, Reward, RewardWorkerError
from reward_test_utils import random_images

QUERIES = ["a red cat", "a blue dog"]


class GatedReward(Reward):
    """Scores the mean pixel once ``gate`` is set; raises on a query "boom"."""

    name = "gated"

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()

    def score_batch(self, images, queries, metadata):
        self.gate.wait(timeout=10)
        if "boom" in queries:
            raise RuntimeError("exploded")
        return images.mean(dim=(1, 2, 3))


def test_worker_returns_the_same_scores_as_a_direct_call(tiny_rewards):
    reward = tiny_rewards["pickscore"]
    batches = [random_images(2, seed=s) for s in range(3)]
    with AsyncRewardWorker(reward) as worker:
        jobs = [worker.submit(images, QUERIES, batch_id=f"step{i}") for i, images in enumerate(batches)]
        results = [job.result(timeout=60) for job in jobs]
    assert [job.batch_id for job in jobs] == ["step0", "step1", "step2"]
    for images, result in zip(batches, results):
        torch.testing.assert_close(result.scores, reward(images, QUERIES).scores, rtol=0, atol=0)


def test_errors_surface_at_result_with_the_batch_id():
    reward = GatedReward()
    reward.gate.set()
    with AsyncRewardWorker(reward) as worker:
        job = worker.submit(torch.rand(2, 3, 4, 4), ["ok", "boom"], batch_id=7)
        with pytest.raises(RewardWorkerError, match="batch 7 failed: RuntimeError: exploded") as info:
            job.result(timeout=10)
    assert info.value.batch_id == 7 and isinstance(info.value.__cause__, RuntimeError)


def test_timeout_names_the_batch_and_tensors_are_snapshotted():
    reward = GatedReward()
    images = torch.rand(2, 3, 4, 4)
    expected = images.mean(dim=(1, 2, 3))
    with AsyncRewardWorker(reward, timeout=0.05) as worker:
        job = worker.submit(images, QUERIES)
        images.zero_()  # the sampler reuses its buffer while the reward waits
        with pytest.raises(TimeoutError, match="batch 0 not done after 0.05 s"):
            job.result()
        reward.gate.set()
        torch.testing.assert_close(job.result(timeout=10).scores, expected)


def test_bad_inputs_fail_at_submit():
    with AsyncRewardWorker(GatedReward()) as worker:
        with pytest.raises(ValueError, match="2 images but 1 queries"):
            worker.submit(torch.rand(2, 3, 4, 4), ["one"])
