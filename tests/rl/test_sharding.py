"""Contracts of the FSDP2 helpers that run in one process (the sharded paths run in test_trainer_distributed.py)."""
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from promptloop.rl.config import GRPOSection
from promptloop.rl.sharding import is_fully_sharded, load_adapter_state, whole_parameters
from promptloop.rl.trainer import check_sharding


def _accelerator(distributed_type, fsdp2=True):
    return SimpleNamespace(distributed_type=distributed_type, is_fsdp2=fsdp2)


def _config(**grpo):
    return SimpleNamespace(grpo=GRPOSection(**grpo))


def test_fsdp1_deepspeed_and_vllm_under_fsdp_are_refused_with_the_fix():
    check_sharding(_accelerator(DistributedType.FSDP), _config())
    check_sharding(_accelerator(DistributedType.MULTI_GPU, fsdp2=False), _config(rollout_backend="vllm"))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_sharding(_accelerator(DistributedType.FSDP, fsdp2=False), _config())
    with pytest.raises(ValueError, match="rollout_backend='vllm' runs in one process without FSDP"):
        check_sharding(_accelerator(DistributedType.FSDP), _config(rollout_backend="vllm"))
    with pytest.raises(ValueError, match="does not run under DeepSpeed.*configs/accelerate/fsdp.yaml"):
        check_sharding(_accelerator(DistributedType.DEEPSPEED, fsdp2=False), _config())


class _LoraLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base_layer = torch.nn.Linear(2, 2, bias=False).requires_grad_(False)
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 1, bias=False)})


def test_a_saved_adapter_is_loaded_by_peft_names_and_a_mismatch_is_an_error():
    model = torch.nn.Sequential(_LoraLinear())
    assert not is_fully_sharded(model)
    with whole_parameters(model):  # nothing to gather
        pass
    weights = {"0.lora_A.weight": torch.full((1, 2), 3.0), "0.base_layer.weight": torch.eye(2)}
    load_adapter_state(model, weights, "default")
    assert torch.equal(model[0].lora_A["default"].weight, weights["0.lora_A.weight"])
    assert torch.equal(model[0].base_layer.weight, torch.eye(2))
    with pytest.raises(ValueError, match="trainable parameters not saved"):
        load_adapter_state(model, {"0.base_layer.weight": torch.eye(2)}, "default")
    with pytest.raises(ValueError, match="not in the policy"):
        load_adapter_state(model, dict(weights, extra=torch.zeros(1)), "default")
