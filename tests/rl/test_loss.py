"""GRPO loss and advantages: checked against TRL's GRPOTrainer._compute_loss (TRL is a test-only dependency)."""
import os
import tempfile

import pytest
import torch

from promptloop.rl.advantages import group_advantages
from promptloop.rl.loss import grpo_loss


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    out = group_advantages(r, g, eps=0.0)
    assert torch.allclose(out.advantages[:3], torch.tensor([-1.0, 0.0, 1.0]))  # mean 2, unbiased std 1
    assert torch.equal(out.advantages[3:], torch.zeros(3))
    assert out.zero_std_ratio == 0.5 and out.num_dropped == 0


def test_group_advantages_drops_non_finite_rewards():
    r = torch.tensor([1.0, float("nan"), 3.0, float("inf"), 0.0, 1.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    out = group_advantages(r, g, eps=0.0)
    assert out.num_dropped == 2
    assert out.valid.tolist() == [True, False, True, False, True, True]
    assert torch.isfinite(out.advantages).all()
    s = torch.tensor([1.0, 3.0]).std()
    assert torch.allclose(out.advantages[[0, 2]], torch.tensor([-1.0, 1.0]) / s)
    assert out.advantages[1] == 0 and out.advantages[3] == 0


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="same length"):
        group_advantages(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(2), torch.zeros(2), scale="rank")


def test_rows_without_valid_tokens_change_neither_loss_nor_metrics():
    torch.manual_seed(0)
    logps, old = torch.randn(2, 5), torch.randn(2, 5)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)  # row 1: a failed reward
    for normalisation in ("token", "sequence"):
        alone_in = logps[:1].clone().requires_grad_()
        alone = grpo_loss(alone_in, old[:1], adv[:1], mask[:1], normalisation=normalisation)
        both_in = logps.clone().requires_grad_()
        both = grpo_loss(both_in, old, adv, mask, normalisation=normalisation, num_tokens=3, num_sequences=1)
        alone.loss.backward()
        both.loss.backward()
        assert torch.allclose(both.loss, alone.loss) and both.metrics == alone.metrics
        assert torch.allclose(both_in.grad[:1], alone_in.grad) and not both_in.grad[1].any()
    empty = grpo_loss(logps, old, adv, torch.zeros(2, 5, dtype=torch.bool))
    assert empty.metrics == {} and empty.loss == 0  # nothing to describe (no +-finfo.max ratio extremes)


def test_on_policy_ratio_is_one_and_gradient_is_policy_gradient():
    torch.manual_seed(0)
    logps = torch.randn(4, 6, requires_grad=True)
    mask = torch.ones(4, 6)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    out = grpo_loss(logps, logps.detach(), adv, mask)
    assert out.metrics["losses/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    out.loss.backward()
    # on-policy the surrogate's gradient is -A / num_tokens for every token
    assert torch.allclose(logps.grad, (-adv / 24).unsqueeze(1).expand(4, 6))


@pytest.fixture(scope="module")
def trl_trainer_factory():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from transformers import Qwen2Tokenizer

    from promptloop.testing.tokenizers import byte_symbols

    vocab = {c: i for i, c in enumerate(byte_symbols())}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model_dir = tempfile.mkdtemp()
    model.save_pretrained(model_dir)  # TRL loads the reference model (beta != 0) from this path
    tok.save_pretrained(model_dir)
    ds = Dataset.from_list([{"prompt": "a red cat"}] * 4)

    def make(loss_type, beta):
        args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4,
                              max_completion_length=5, use_cpu=True, report_to="none", loss_type=loss_type,
                              beta=beta, epsilon=0.2, epsilon_high=0.28, bf16=False)
        tr = trl.GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                             args=args, train_dataset=ds, processing_class=tok)
        tr.current_gradient_accumulation_steps = 1
        return tr

    return make


@pytest.mark.parametrize("loss_type,normalisation", [("grpo", "sequence"), ("bnpo", "token")])
@pytest.mark.parametrize("beta,kl_weighting", [(0.0, True), (0.05, True), (0.05, False)])
def test_loss_equals_trl(trl_trainer_factory, loss_type, normalisation, beta, kl_weighting):
    tr = trl_trainer_factory(loss_type, beta)
    tr.args.use_bias_correction_kl = kl_weighting
    model = tr.model
    model.train()
    torch.manual_seed(1)
    B, P, C = 4, 3, 5
    prompt_ids = torch.randint(0, 200, (B, P))
    completion_ids = torch.randint(0, 200, (B, C))
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[2, 4:] = 0
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1)).logits[:, P - 1:-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    old = lp + 0.3 * torch.randn_like(lp)  # ratios far from 1: both clip sides are active
    ref = lp + 0.2 * torch.randn_like(lp)
    adv = torch.tensor([1.5, -0.7, 0.3, -1.2])
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=adv, old_per_token_logps=old,
                  num_items_in_batch=completion_mask.sum())
    if beta:
        inputs["ref_per_token_logps"] = ref
    trl_loss = tr._compute_loss(model, inputs)
    ours = grpo_loss(lp, old, adv, completion_mask, clip_low=0.2, clip_high=0.28, beta=beta,
                     ref_logps=ref if beta else None, normalisation=normalisation,
                     kl_importance_weighting=kl_weighting)
    assert ours.metrics["losses/clipfrac_low"] + ours.metrics["losses/clipfrac_high"] > 0
    assert float(ours.loss) == pytest.approx(float(trl_loss.detach()), abs=1e-5)
