"""The reward model's feature cache: answers seen by an earlier run are not computed again,
the file stays bounded, and a damaged file costs a recomputation, not a run."""

from __future__ import annotations

import numpy as np
import pytest

from train import reward


def fake_features(calls):
    def answer_features(model, tokenizer, items):
        calls.append([a for _, a in items])
        return np.array([[float(len(a)), float(sum(map(ord, a)))] for _, a in items])
    return answer_features


def items(*answers):
    return [([{"role": "user", "content": "hi"}], a) for a in answers]


def test_known_answers_are_not_computed_again_and_survive_a_restart(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(reward, "answer_features", fake_features(calls))
    path = tmp_path / "cache" / "teto.npz"
    cache = reward.FeatureCache(path)
    first = cache.features(None, None, items("a", "bb", "a", "ccc"))
    assert calls == [["a", "bb", "ccc"]] and first.shape == (4, 2) and (first[0] == first[2]).all()
    cache.save()
    again = reward.FeatureCache(path)                         # the next run
    second = again.features(None, None, items("ccc", "dddd", "bb"))
    assert calls[1:] == [["dddd"]] and again.computed == 1
    assert (second[0] == first[3]).all() and (second[2] == first[1]).all()
    other_prompt = again.features(None, None, [([{"role": "user", "content": "yo"}], "bb")])
    assert calls[2:] == [["bb"]] and other_prompt.shape == (1, 2)   # same answer, another prompt: not the same


def test_the_file_keeps_the_most_recently_used_answers_only(tmp_path, monkeypatch):
    monkeypatch.setattr(reward, "answer_features", fake_features([]))
    path = tmp_path / "teto.npz"
    cache = reward.FeatureCache(path, limit=3)
    cache.features(None, None, items("a", "b", "c", "d"))
    cache.features(None, None, items("a"))                    # used again: kept
    cache.save()
    kept = reward.FeatureCache(path, limit=3)
    assert len(kept.rows) == 3
    calls = []
    monkeypatch.setattr(reward, "answer_features", fake_features(calls))
    kept.features(None, None, items("a", "b", "c", "d"))
    assert calls == [["b"]]                                   # the least recently used went


def test_a_damaged_file_is_computed_again(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(reward, "answer_features", fake_features(calls))
    path = tmp_path / "teto.npz"
    path.write_bytes(b"not a numpy file")
    cache = reward.FeatureCache(path)
    assert cache.features(None, None, items("a")).shape == (1, 2) and calls == [["a"]]
    cache.save()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])   # a write cut short
    assert reward.FeatureCache(path).rows == {}
    cache.save()
    assert len(reward.FeatureCache(path).rows) == 1


def unpacked_features(model, tokenizer, messages, answer):
    """One answer in a row of its own, as the features were first computed."""
    import math

    import torch

    prompt = reward.prompt_ids(tokenizer, messages)
    ids = prompt + tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad(), model.disable_adapter():
        hidden = model.get_base_model().model(input_ids=torch.tensor([ids])).last_hidden_state[0, len(prompt):]
    return np.concatenate([hidden.mean(0).numpy(), hidden[-1].numpy(), [math.log1p(len(ids) - len(prompt))]])


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_gemma_dir"])
def test_answers_packed_by_prompt_get_the_features_of_their_own_rows(which, request):
    from test_pair_logps import ask, model_and_tokenizer

    model, tokenizer = model_and_tokenizer(which, request)
    items = [(ask("Plans tonight?"), "Ramen, then karaoke."), (ask("Hi"), "Hey."),
             (ask("Plans tonight?"), "Sleep early. " * 12), (ask("Plans tonight?"), "No idea"),
             (ask("What is 2 + 2?"), "Four, obviously."), (ask("Hi"), "Hello there, how are you today?"),
             (ask("Plans tonight?"), "Maybe a movie?")]
    for max_width, batch_rows in ((512, 8), (70, 2)):   # whole groups in one batch; groups split, several batches
        packed = reward.answer_features(model, tokenizer, items, max_width=max_width, batch_rows=batch_rows)
        for row, (messages, answer) in zip(packed, items):
            assert np.allclose(row, unpacked_features(model, tokenizer, messages, answer), atol=1e-4)
