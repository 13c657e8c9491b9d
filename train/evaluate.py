"""Held-out evaluation: mean negative log-likelihood of reference answers.

The figure is per answer token (total NLL / total answer tokens), computed
with the persona's system prompt, so base model and adapter are scored on
exactly the same tokens. Lower is better; the SFT run records both and the
relative reduction in the adapter's ``meta.json``. A retraining run scores a
persona's held-out splits (its dialogues, its refusals) under the candidate and
under the frozen copy of the active adapter (``adapters_nll``).
"""

from __future__ import annotations

from train.chat_tokens import IGNORE, Tokenized, tokenize_chat, with_system
from train.data import load_files


def tokenize_examples(tokenizer, examples, system_prompt: str | None) -> list[Tokenized]:
    return [tokenize_chat(tokenizer, with_system(e.messages, system_prompt)) for e in examples]


def answer_nll(model, batch: list[Tokenized], pad_id: int) -> tuple[float, int]:
    """Summed NLL of the labelled tokens in ``batch`` and their count."""
    total, count = labelled_nll(model, batch, pad_id)
    return total.item(), count


def labelled_nll(model, batch: list[Tokenized], pad_id: int):
    """(summed NLL of the labelled tokens in ``batch`` as a tensor, with its graph; their
    count), with the LM head applied only where a label follows."""
    import torch

    width = max(len(t.input_ids) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, t in enumerate(batch):
        n = len(t.input_ids)
        ids[row, :n] = torch.tensor(t.input_ids)
        labels[row, :n] = torch.tensor(t.labels)
        mask[row, :n] = 1
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    targets = labels[:, 1:].to(device)
    keep = targets != IGNORE
    logits = base.lm_head(hidden[:, :-1][keep]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, int(keep.sum())


def mean_nll(model, tokenized: list[Tokenized], pad_id: int, batch_size: int = 8) -> dict:
    """Token-weighted mean NLL over all answers, in eval mode without gradients."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # Batching neighbours by length keeps padding (wasted compute) small.
    order = sorted(range(len(tokenized)), key=lambda i: len(tokenized[i].input_ids))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [tokenized[i] for i in order[start : start + batch_size]]
            nll, n = answer_nll(model, batch, pad_id)
            total, count = total + nll, count + n
    if was_training:
        model.train()
    return {"mean_nll": total / max(count, 1), "answer_tokens": count, "examples": len(tokenized)}


def nll_by_language(model, tokenized: list[Tokenized], languages: list[str], pad_id: int) -> dict[str, dict]:
    """``mean_nll`` of each language's dialogues on its own (``languages[i]`` is the language
    of ``tokenized[i]``): ``{"en": {"mean_nll", "answer_tokens", "examples"}, ...}``. A drop in
    one language's loss could otherwise hide a rise in another's."""
    out = {}
    for language in dict.fromkeys(languages):
        group = [t for t, lang in zip(tokenized, languages) if lang == language]
        out[language] = mean_nll(model, group, pad_id)
    return out


def pooled(by_language: dict[str, dict]) -> dict:
    """The token-weighted mean over all languages of ``nll_by_language``'s figures."""
    tokens = sum(v["answer_tokens"] for v in by_language.values())
    total = sum(v["mean_nll"] * v["answer_tokens"] for v in by_language.values())
    return {"mean_nll": total / max(tokens, 1), "answer_tokens": tokens,
            "examples": sum(v["examples"] for v in by_language.values())}


def split_files(persona, split: str, languages: list[str]) -> list[tuple]:
    """(path, language) of the persona's ``split`` files in ``languages``."""
    return [(persona.resolve(f.path), f.language) for f in persona.files(split, languages)]


def split_hash(persona, split: str, languages: list[str]) -> str | None:
    """A fingerprint of those files (a loss measured on them is reused only on the same data)."""
    from train.data import data_hash

    files = split_files(persona, split, languages)
    return data_hash([path for path, _ in files], languages) if files else None


def adapters_nll(model, tokenizer, persona, split: str, languages: list[str], adapter: str = "default",
                 active: float | None = None) -> dict:
    """Mean NLL per answer token of the persona's ``split`` dialogues in ``languages`` under
    the candidate (``adapter``, "default") and, where the model holds it, the frozen copy of
    the active adapter ("ref"; ``active``: its value, already known, not computed again):
    ``{"candidate": x, "active": y}``; ``{}`` when there are none."""
    files = split_files(persona, split, languages)
    examples = load_files(files, languages) if files else []
    if not examples:
        return {}
    tokenized = tokenize_examples(tokenizer, examples, persona.system_prompt)
    model.set_adapter(adapter)
    out = {"candidate": mean_nll(model, tokenized, tokenizer.pad_token_id)["mean_nll"]}
    model.set_adapter("default")
    if active is not None and adapter == "default":
        out["active"] = active
    elif "ref" in model.peft_config and adapter == "default":
        model.set_adapter("ref")
        try:
            out["active"] = mean_nll(model, tokenized, tokenizer.pad_token_id)["mean_nll"]
        finally:
            model.set_adapter("default")
    return out
