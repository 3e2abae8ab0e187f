"""The GRPO objective: token-level clipped surrogate with an optional KL penalty to a reference policy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

LossNormalisation = Literal["token", "sequence"]


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor
    """Scalar to backpropagate."""
    metrics: dict[str, float]
    """Detached statistics over the masked tokens (names follow ``losses/...`` conventions)."""


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.0,
    ref_logps: Optional[torch.Tensor] = None,
    normalisation: LossNormalisation = "token",
    num_tokens: Optional[float] = None,
    num_sequences: Optional[float] = None,
    kl_importance_weighting: bool = True,
) -> GRPOLossOutput:
    """Clipped surrogate ``-min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A) + beta * KL`` per token.

    Shapes: ``logps``, ``old_logps``, ``ref_logps``, ``mask`` are ``(B, T)`` (completion tokens of B actions);
    ``advantages`` is ``(B,)``: every token of an action carries its trajectory's advantage. KL is the k3 estimator
    ``exp(ref - logp) - (ref - logp) - 1``; the tokens were sampled from the old policy, so with
    ``kl_importance_weighting`` it is weighted by ``rho`` to estimate the KL under the current policy (as TRL does
    by default). ``normalisation="token"`` averages over all masked tokens of the
    batch (divided by ``num_tokens`` when given, e.g. the token count of a whole gradient-accumulation window);
    ``"sequence"`` averages per action first, then over the B actions (divided by ``num_sequences`` when given, e.g.
    the actions with valid tokens in a whole window). The metrics are means over the masked tokens; with no masked
    token they are empty (nothing to describe).
    """
    if logps.shape != old_logps.shape or logps.shape != mask.shape:
        raise ValueError(f"logps, old_logps and mask must share a shape, got {logps.shape}, {old_logps.shape}, "
                         f"{mask.shape}")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be ({logps.shape[0]},), got {tuple(advantages.shape)}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (log-probs of the reference policy)")
    mask = mask.to(logps.dtype)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        if kl_importance_weighting:
            kl = kl * ratio
        per_token = per_token + beta * kl
    if normalisation == "token":
        denom = mask.sum().clamp(min=1.0) if num_tokens is None else torch.as_tensor(float(num_tokens))
        loss = (per_token * mask).sum() / denom
    elif normalisation == "sequence":
        per_action = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        loss = per_action.mean() if num_sequences is None else per_action.sum() / float(num_sequences)
    else:
        raise ValueError(f"normalisation must be 'token' or 'sequence', got {normalisation!r}")

    if not mask.any():
        return GRPOLossOutput(loss=loss, metrics={})
    with torch.no_grad():
        n = mask.sum()

        def masked_mean(x: torch.Tensor) -> float:
            return float((x * mask).sum() / n)

        metrics = {
            "losses/clipfrac_low": masked_mean(((ratio < 1 - clip_low) & (adv < 0)).to(mask.dtype)),
            "losses/clipfrac_high": masked_mean(((ratio > 1 + clip_high) & (adv > 0)).to(mask.dtype)),
            "losses/approx_kl": masked_mean((ratio - 1) - log_ratio),
            "losses/ratio_mean": masked_mean(ratio),
            "losses/ratio_max": float(ratio[mask > 0].max()),
            "losses/ratio_min": float(ratio[mask > 0].min()),
        }
        if kl is not None:
            metrics["losses/kl"] = masked_mean(kl)
    return GRPOLossOutput(loss=loss, metrics=metrics)
