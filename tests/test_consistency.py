"""Persona consistency scoring (train/consistency.py): answers scored in batches get the
per-token log-probs they get one at a time, under an adapter and under the bare base model."""

from __future__ import annotations

import pytest


def one_at_a_time(model, tokenizer, items, adapter):
    """The per-token log-prob of each answer in a forward pass of its own."""
    from contextlib import nullcontext

    import torch

    from train.reward import prompt_ids

    if adapter is not None:
        model.set_adapter(adapter)
    out = []
    with torch.no_grad(), model.disable_adapter() if adapter is None else nullcontext():
        for messages, answer in items:
            prompt = prompt_ids(tokenizer, messages)
            ids = torch.tensor([prompt + tokenizer(answer, add_special_tokens=False)["input_ids"]])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            out.append(-torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):]).item())
    return out


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_gemma_dir"])
def test_batched_per_token_logps_equal_one_row_each(which, request):
    from test_pair_logps import ask, model_and_tokenizer

    from train.consistency import per_token_logps

    model, tokenizer = model_and_tokenizer(which, request)
    items = [(ask("Plans tonight?"), "Ramen, then karaoke."), (ask("Hi"), "Hey."),
             (ask("What should I read?"), "Try a short novel. " * 6), (ask("2 + 2?"), "Four, obviously!")]
    for adapter in ("default", None):
        batched = per_token_logps(model, tokenizer, items, adapter, batch_size=3)
        assert batched == pytest.approx(one_at_a_time(model, tokenizer, items, adapter), abs=1e-4)
    assert per_token_logps(model, tokenizer, items, "default") != per_token_logps(model, tokenizer, items, None)
