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


_WHOLE: set[int] = set()
"""ids of the models inside :func:`whole_parameters` (an inner call is a no-op)."""


@contextlib.contextmanager
def whole_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every parameter of ``model`` is whole on this process (plain tensors: forwards gather nothing). A
    collective: every process enters it together. Writes to the parameters inside are not kept. Each FSDP module's
    own resharding after forward (accelerate sets it per module) is restored on exit; nested calls are no-ops."""
    modules = _fsdp_modules(model)
    if not modules or id(model) in _WHOLE:
        yield
        return
    # The root must be initialised first: the forwards of ``generate`` start below it, and the first FSDP module
    # to run forward would otherwise take itself for the root. Neither this nor reading a module's resharding
    # setting has a public call.
    modules[0]._get_fsdp_state()._lazy_init()
    saved = []
    for module in modules:
        state = module._get_fsdp_state()
        saved.append((state, state._auto_reshard_after_forward,
                      [(group, group.post_forward_mesh_info) for group in state._fsdp_param_groups]))
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    _WHOLE.add(id(model))
    try:
        yield
    finally:
        _WHOLE.discard(id(model))
        for module in modules:
            module.reshard()
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for group, mesh_info in groups:
                group.post_forward_mesh_info = mesh_info


def reshard_settings(model: torch.nn.Module) -> list[bool]:
    """Per FSDP parameter group of ``model``: whether it reshards after forward (for tests and debugging)."""
    return [group.post_forward_mesh_info is not None for module in _fsdp_modules(model)
            for group in module._get_fsdp_state()._fsdp_param_groups]


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
    """The optimizer's state to save: for a sharded ``model`` that has taken a step, the full state keyed by
    parameter names, on CPU, on the main process (a collective: every process calls it); otherwise
    ``optimizer.state_dict()`` (keyed by position, as without FSDP)."""
    # torch's full-state gather would first run a zero-gradient step on an optimizer without state
    if not is_fully_sharded(model) or not optimizer.state:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what :func:`optimizer_state` returned, by this run or by one with another sharding (every process
    passes the full state it read)."""
    if not is_fully_sharded(model):
        optimizer.load_state_dict(state)  # maps either keying through param_groups
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, _keyed_by_name(model, optimizer, state),
                             options=StateDictOptions(full_state_dict=True))


def _keyed_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A state keyed by position (``optimizer.state_dict()``) keyed by parameter names instead."""
    if all(isinstance(p, str) for group in state["param_groups"] for p in group["params"]):
        return state
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = {}
    for saved, live in zip(state["param_groups"], optimizer.param_groups):
        names.update({index: name_of[id(p)] for index, p in zip(saved["params"], live["params"])})
    groups = [dict(group, params=[names[i] for i in group["params"]]) for group in state["param_groups"]]
    return {"state": {names[index]: value for index, value in state["state"].items()}, "param_groups": groups}
