"""Persona consistency: does a version still sound like its persona?

The score of an adapter is the share of the persona's held-out prompts whose
greedy answer (by that adapter) is more likely, per token, under the persona's
own SFT adapter than under every other persona's SFT adapter and under the
bare base model. It is a likelihood-ratio classifier between persona adapters:
each SFT adapter is already a language model of one persona's dialogues, so no
separate classifier needs training or data, it works for any number of
personas (with one persona, the base model is the contrast), and it scores the
text the version actually says, not its likelihood of the reference dialogues
(the persona loss does that). A DPO run that drifts toward a voter's taste and
away from the persona (another persona's tone, or generic base-model text)
loses score; the gate refuses a candidate whose score falls more than the
recipe's ``max_consistency_drop`` below the active version's.

    scores = consistency_scores(model, tokenizer, persona, {"candidate": "default", "active": "ref"})
    # {"candidate": 0.88, "active": 0.92, "sft": 0.96}
"""

from __future__ import annotations

from contextlib import nullcontext

from train import registry

# Held-out prompts a version is scored on. With 16, one prompt was 6.25 points, more than the
# gate's 5-point bound, so a single prompt changing side refused a candidate (seen: 100% -> 94%).
# 32 makes a prompt about 3 points: the bound then refuses a net loss of two prompts.
MAX_PROMPTS = 32
MAX_TOKENS = 48


def heldout_prompts(persona, limit: int = MAX_PROMPTS) -> list[list[dict]]:
    from train.data import load_files

    files = [(persona.resolve(f.path), f.language) for f in persona.files("heldout", ["en"])]
    users = [next(m["content"] for m in e.messages if m["role"] == "user") for e in load_files(files, ["en"])]
    return [[{"role": "system", "content": persona.system_prompt}, {"role": "user", "content": u}]
            for u in list(dict.fromkeys(users))[:limit]]


def load_judges(model, persona) -> list[str]:
    """Load every persona's SFT adapter into ``model`` as ``judge-<name>``; returns the
    adapter names, the persona's own first."""
    from train.personas import list_personas

    names = []
    for other in sorted(list_personas(), key=lambda p: p.name != persona.name):
        version = registry.sft_version(other.name)
        name = f"judge-{other.name}"
        if version is not None and name not in model.peft_config:
            model.load_adapter(str(version.path), adapter_name=name, is_trainable=False)
        if version is not None:
            names.append(name)
    return names


def greedy_answers(model, tokenizer, prompts: list[list[dict]], adapter: str) -> list[str]:
    from train.reward import sample_answers

    model.set_adapter(adapter)
    return [group[0] for group in sample_answers(model, tokenizer, prompts, 1, MAX_TOKENS, 0.0)]


def per_token_logps(model, tokenizer, items: list[tuple[list[dict], str]], adapter: str | None,
                    batch_size: int = 16) -> list[float]:
    """Mean log-prob per answer token under ``adapter`` (None: the base model), in batches
    of neighbours by length (32 answers under 3 judges: 17.7 s one row at a time, 12.4 s batched)."""
    import torch

    from train.pair_logps import completion_logps
    from train.reward import prompt_ids

    seqs = []
    for messages, answer in items:
        prompt = prompt_ids(tokenizer, messages)
        seqs.append((prompt, tokenizer(answer, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    out = [0.0] * len(seqs)
    model.eval()
    if adapter is not None:
        model.set_adapter(adapter)
    with torch.no_grad(), model.disable_adapter() if adapter is None else nullcontext():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            completion = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                prompt, answer = seqs[i]
                ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
                attention[row, : len(prompt) + len(answer)] = 1
                completion[row, len(prompt) : len(prompt) + len(answer)] = 1
            sums, counts = completion_logps(model, {"input_ids": ids, "attention_mask": attention,
                                                    "completion_mask": completion}, per_token=True)
            for row, i in enumerate(rows):
                out[i] = (sums[row] / counts[row]).item()
    return out


def judge_versions(persona) -> dict[str, int]:
    """The SFT version of every persona (the judges a score was computed with)."""
    from train.personas import list_personas

    return {p.name: v.version for p in list_personas() if (v := registry.sft_version(p.name)) is not None}


def data_fingerprint(persona) -> str | None:
    """What a score was measured on: the held-out files and how many of their prompts."""
    from train.evaluate import split_hash

    files = split_hash(persona, "heldout", ["en"])
    return files and f"{files}:{MAX_PROMPTS}"


def same_judges(metrics: dict, persona) -> bool:
    """Whether a recorded score was computed by today's judges on today's held-out prompts."""
    return metrics.get("consistency_judges") == judge_versions(persona) and \
        metrics.get("consistency_data") == data_fingerprint(persona)


def known_scores(active, persona) -> dict[str, float]:
    """Scores the run need not compute again: the active version's own score and the SFT
    version's, from the active version's metrics when they were computed with the same
    judges (the same greedy answers score the same), or, when the active version is the SFT
    version, both from its setup score or else from one computation; label -> score, or
    label -> another label."""
    if active is None:
        return {}
    metrics = active.meta.get("metrics", {})
    same = same_judges(metrics, persona)
    if active.meta.get("kind") == "sft":  # its score, from setup (train.baseline), is the SFT score
        score = metrics.get("consistency_candidate") if same else None
        return {"active": score, "sft": score} if score is not None else {"sft": "active"}
    if not same:
        return {}  # other judges, or other held-out prompts: scored again
    known = {"active": metrics.get("consistency_candidate"), "sft": metrics.get("consistency_sft")}
    return {label: score for label, score in known.items() if score is not None}


def consistency_scores(model, tokenizer, persona, adapters: dict[str, str],
                       known: dict[str, float | str] | None = None) -> dict[str, float]:
    """The score of each adapter of ``model`` (a PeftModel; ``adapters``: label -> adapter
    name) on the persona's held-out prompts, and of the persona's SFT version ("sft");
    ``known``: label -> a score already known, or the label whose score it equals (not
    computed again); {} when the persona has no SFT version or no held-out prompts."""
    known = known or {}
    prompts = heldout_prompts(persona)
    todo = {label: a for label, a in {**adapters, "sft": f"judge-{persona.name}"}.items() if label not in known}
    judges = load_judges(model, persona) if todo else [f"judge-{persona.name}"]
    if not prompts or not judges or judges[0] != f"judge-{persona.name}":
        return {}
    scores = {}
    for label, adapter in todo.items():
        if adapter not in model.peft_config:
            continue
        items = list(zip(prompts, greedy_answers(model, tokenizer, prompts, adapter)))
        own = per_token_logps(model, tokenizer, items, judges[0])
        others = [per_token_logps(model, tokenizer, items, j) for j in judges[1:]]
        others.append(per_token_logps(model, tokenizer, items, None))
        scores[label] = round(sum(o > max(rest) for o, *rest in zip(own, *others)) / len(items), 3)
    for label, value in known.items():
        score = scores.get(value) if isinstance(value, str) else value
        if score is not None:
            scores[label] = score
    for judge in judges:
        if judge in model.peft_config:
            model.delete_adapter(judge)
    model.set_adapter("default")
    return scores
