"""Pairs packed with their prompt computed once give the log-probs, and the gradients, of
the same pairs unpacked (train/pair_logps.py), on a tiny Llama (SmolLM2's) and a tiny
Gemma 3 (sliding-window layers, its own masks)."""

from __future__ import annotations

import pytest

from train.pair_logps import _split, completion_logps, pair_logps


def peft_model(model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))


def model_and_tokenizer(which: str, request):
    """The peft model and tokenizer of a tiny-model fixture, by the fixture's name."""
    from transformers import AutoTokenizer

    model_dir = request.getfixturevalue(which)
    return peft_model(model_dir), AutoTokenizer.from_pretrained(model_dir)


def ask(text: str) -> list[dict]:
    """A chat prompt to Teto."""
    return [{"role": "system", "content": "You are Teto."}, {"role": "user", "content": text}]


def batch(vocab: int, seed: int = 0):
    """Four pairs of uneven prompts and answers (one answer a single token), as TRL's
    preference collator pads them: chosen rows, then rejected rows, right-padded."""
    import random

    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rng = random.Random(seed)
    draw = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    examples = [{"prompt_ids": draw(p), "chosen_ids": draw(c), "rejected_ids": draw(r)}
                for p, c, r in [(7, 5, 9), (12, 1, 4), (3, 8, 8), (9, 6, 1)]]
    return DataCollatorForPreference(pad_token_id=0)(examples)


def grads(model, logps_fn, inputs):
    import torch

    model.zero_grad()
    logps, tokens = logps_fn(model, inputs, per_token=True)
    weights = torch.linspace(-1.0, 2.0, logps.numel())
    (logps * weights / tokens).sum().backward()
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), tokens, named


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_gemma_dir"])
def test_packed_pairs_match_unpacked_logps_and_gradients(which, request):
    import torch

    model = peft_model(request.getfixturevalue(which))
    inputs = batch(model.config.vocab_size)
    assert _split(inputs) == [(7, 5, 9), (12, 1, 4), (3, 8, 8), (9, 6, 1)]
    packed, packed_tokens, packed_grads = grads(model, pair_logps, inputs)
    plain, plain_tokens, plain_grads = grads(model, completion_logps, inputs)
    assert torch.allclose(packed, plain, atol=1e-4), (packed, plain)
    assert packed_tokens.tolist() == plain_tokens.tolist() == [5, 1, 8, 6, 9, 4, 8, 1]
    assert packed_grads.keys() == plain_grads.keys() and packed_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-3), name


def test_rows_that_do_not_share_their_prompt_are_computed_unpacked(tiny_model_dir):
    import torch

    model = peft_model(tiny_model_dir)
    inputs = batch(model.config.vocab_size)
    inputs["input_ids"][4, 2] += 1  # the first rejected row's prompt differs from its chosen row's
    assert _split(inputs) is None
    with torch.no_grad():
        assert torch.equal(pair_logps(model, inputs), completion_logps(model, inputs))
