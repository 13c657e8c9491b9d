"""Generation on a CPU with the adapter merged (and bf16 autocast when sampling): the same
model inside, the same weights after (train/reward.py generation_mode)."""

from __future__ import annotations

from test_pair_logps import peft_model

from train.reward import generation_mode


def test_merged_generation_is_the_same_model_and_leaves_the_weights_as_they_were(tiny_model_dir):
    import torch

    model = peft_model(tiny_model_dir).eval()
    ids = torch.tensor([[5, 9, 13, 200, 7, 31]])
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with generation_mode(model, sampling=False):
            assert all(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
            assert not torch.is_autocast_enabled("cpu")
            merged = model(input_ids=ids).logits
        with generation_mode(model, sampling=True):
            assert torch.is_autocast_enabled("cpu")
            sampled = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.allclose(merged, before, atol=1e-4) and torch.allclose(sampled.float(), before, atol=0.1)
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    assert torch.allclose(after, before, atol=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(param, weights[name], atol=1e-6), name


def test_a_model_without_adapters_is_left_alone(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with generation_mode(model, sampling=True):
        assert not torch.is_autocast_enabled("cpu")
