"""The policy under FSDP2 (accelerate's ``fsdp_version: 2``): sharded in the update, whole while it samples.

``fully_shard`` keeps each process's shard of the parameters and gathers a layer's full weights in that layer's
forward. Sampling runs through ``generate``, which calls the inner model, not the sharded root: the root's own
parameters (Qwen-VL's patch embedding, the LM head) would stay sharded, and every token would all-gather every
layer again, in lockstep across processes that sample answers of different lengths. So the trainer gathers the
whole policy on every process for rollouts and evaluation (as TRL gathers ZeRO-3 weights for generation): the
memory of one full copy of the policy per process while it samples, none of its collectives. Checkpoints gather
the trainable (LoRA) weights and the optimizer state only.
Without FSDP2 every function here is a no-op or the plain operation.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch


def _fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """``model`` (or one of its modules) is sharded by FSDP2's ``fully_shard``."""
    return bool(_fsdp_modules(model))


@contextlib.contextmanager
def whole_parameters(model: torch.nn.Module, reshard_after_forward: bool = True) -> Iterator[None]:
    """Inside, every parameter of ``model`` is whole on this process (plain tensors: forwards gather nothing and
    ``state_dict`` reads full weights). A collective: every process enters it together. Writes to the parameters
    inside are not kept. ``reshard_after_forward``: the FSDP setting restored on exit."""
    modules = _fsdp_modules(model)
    if not modules:
        yield
        return
    # The root must be initialised first: the forwards of ``generate`` start below it, and the first FSDP module
    # to run forward would otherwise take itself for the root (no public call does this).
    modules[0]._get_fsdp_state()._lazy_init()
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(reshard_after_forward, recurse=False)


def full_adapter_state(model: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """For a sharded peft ``model``, the tensors its ``save_pretrained`` writes (the adapter, and base layers peft
    saves with it) as full CPU tensors keyed as in ``model.state_dict()``, to pass as its ``state_dict`` (a
    collective: every process calls it). None for a model that is not sharded."""
    if not is_fully_sharded(model):
        return None
    from peft import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    sharded = model.state_dict()  # DTensors: no communication
    saved = {id(t) for t in get_peft_model_state_dict(model, state_dict=sharded).values()}
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
            for name, t in sharded.items() if id(t) in saved}


def load_adapter_state(model: torch.nn.Module, weights: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Copy a saved adapter (``adapter_model.safetensors``: full tensors, keys without the adapter's name, as peft
    writes them) into a sharded peft ``model``, each process keeping its shard of each tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    by_key = {name.replace(f".{adapter_name}.", "."): name for name in params}
    unknown = sorted(set(weights) - set(by_key))
    missing = sorted(by_key[k] for k in by_key if params[by_key[k]].requires_grad and k not in weights)
    if unknown or missing:
        raise ValueError(f"The saved adapter does not match the policy (not in the policy: {unknown[:3]}; trainable "
                         f"parameters not saved: {missing[:3]}).")
    with torch.no_grad():
        for key, value in weights.items():
            param = params[by_key[key]]
            if isinstance(param, DTensor):  # every process holds the full tensor: no scatter needed
                value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                          src_data_rank=None).to_local()
                param.to_local().copy_(value)
            else:
                param.copy_(value)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state to save: for a sharded ``model`` the full state keyed by parameter names, on CPU
    (a collective: every process calls it); otherwise ``optimizer.state_dict()``."""
    if not is_fully_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what :func:`optimizer_state` returned (every process passes the full state it read)."""
    if not is_fully_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
