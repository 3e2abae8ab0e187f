"""How each evaluated method samples one batch: the same rollout, different sources of prompts."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

from ..backbones import Backbone, SamplerSettings, rollout, withhold_preview
from ..backbones.types import RolloutOutput
from ..pipeline import apriori_prompts, oneshot_prompts, policy_mode
from ..policy import PromptWriter
from .config import MethodVariant


@contextlib.contextmanager
def adapter_state(policy: PromptWriter, enabled: bool) -> Iterator[PromptWriter]:
    """The policy with its LoRA adapter on (as loaded) or off (the base VLM); a policy without an adapter is its
    base VLM either way."""
    if enabled or not policy.has_adapter:
        yield policy
    else:
        with policy.reference():
            yield policy


def sample_batch(
    variant: MethodVariant,
    backbone: Backbone,
    policy: Optional[PromptWriter],
    queries: Sequence[str],
    seeds: Sequence[int],
    settings: SamplerSettings,
    policy_seed: int,
) -> RolloutOutput:
    """One image per query with ``variant``'s method; ``seeds[i]`` fixes row i's noise for every method."""
    if variant.kind == "base":
        return rollout(backbone, queries, seeds, settings=settings)
    if policy is None:
        raise ValueError(f"Method {variant.label!r} (kind {variant.kind!r}) needs a policy.")
    steps = settings.num_inference_steps
    n, schedule = variant.num_refinements, variant.schedule
    with adapter_state(policy, variant.adapter):
        if variant.kind in ("untrained", "oneshot"):
            initial = oneshot_prompts(policy, queries, steps, seed=policy_seed)
            return rollout(backbone, queries, seeds, settings=settings, initial_prompts=initial)
        if variant.kind == "apriori":
            prompts = apriori_prompts(policy, queries, n, steps, seed=policy_seed)
            return rollout(backbone, queries, seeds, settings=settings, schedule=schedule, prompts=prompts)
        if variant.kind in ("closed", "closed-noimage"):
            with policy_mode(policy, "closed"):
                refine = policy.as_refine_fn(seed=policy_seed)
                if variant.kind == "closed-noimage":
                    refine = withhold_preview(refine)
                return rollout(backbone, queries, seeds, settings=settings, schedule=schedule, refine=refine,
                               feedback_delay=variant.feedback_delay)
    raise ValueError(f"Unknown method kind {variant.kind!r}.")


__all__ = ["adapter_state", "sample_batch", "withhold_preview"]
