"""Log-probs of completions, and of DPO pairs with their shared prompt computed once.

TRL's preference collator gives a batch of ``n`` pairs as ``2n`` rows: each
prompt followed by the chosen answer, then each prompt followed by the
rejected one (right-padded). The prompt (the persona's system prompt and the
user's turn, about 50 tokens on SmolLM2, against answers of 15-60) is then
computed twice, and every row is padded to the longest. ``pair_logps`` packs a
pair into one row instead: prompt, chosen, rejected, with the rejected answer's
position ids restarting where the chosen one's did and a 4D attention mask
under which it sees the prompt but not the chosen answer. Each answer token is
predicted from the same hidden state as in its own row (the first token of
either answer from the prompt's last position), so the log-probs are the same
up to float rounding (tests/test_pair_logps.py checks them and their gradients against
the unpacked ones on tiny Llama and Gemma models), for about a third less
compute in training, in the reference pass and in held-out evaluation.

    logps = pair_logps(model, batch)                   # 2n summed log-probs: chosen, then rejected
    logps, tokens = pair_logps(model, batch, per_token=True)
"""

from __future__ import annotations


def completion_logps(model, inputs, per_token: bool = False):
    """Summed log-probs of each sequence's completion tokens, with the LM head applied only
    at completion positions (TRL's fused head computes log-probs, entropy and top-1 for
    every position over the whole vocabulary); ``per_token``: also their token counts."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        use_cache=False).last_hidden_state
    mask = inputs["completion_mask"][:, 1:].bool()
    rows = torch.arange(mask.size(0), device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    logits = base.lm_head(hidden[:, :-1][mask]).float()
    token_logps = -torch.nn.functional.cross_entropy(logits, inputs["input_ids"][:, 1:][mask], reduction="none")
    sums = torch.zeros(mask.size(0), dtype=token_logps.dtype, device=mask.device).index_add(0, rows, token_logps)
    return (sums, mask.sum(1).clamp(min=1)) if per_token else sums


def _split(inputs) -> list[tuple[int, int, int]] | None:
    """(prompt length, chosen length, rejected length) of each pair, or None when a pair's
    two rows do not share their prompt (or a completion is not one run after it)."""
    ids, attention, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    n = ids.size(0) // 2
    if ids.size(0) != 2 * n or n == 0:
        return None
    lengths, answers = attention.sum(1).tolist(), completion.sum(1).tolist()
    out = []
    for i in range(n):
        c, r = i, i + n
        prompt = lengths[c] - answers[c]
        if prompt < 1 or lengths[r] - answers[r] != prompt or not answers[c] or not answers[r]:
            return None
        if not (bool(completion[c, prompt : lengths[c]].all()) and bool(completion[r, prompt : lengths[r]].all())
                and bool((ids[c, :prompt] == ids[r, :prompt]).all())):
            return None
        out.append((prompt, answers[c], answers[r]))
    return out


def packed_rows(groups: list[tuple[list[int], list[list[int]]]], pad_id: int, dtype, device):
    """One row per group (prompt ids, [answer ids, ...]): the prompt, then each answer in
    turn, each answer's position ids restarting where the prompt ends and a 4D attention
    mask under which it sees the prompt and itself only, so each answer token gets the
    hidden state it would get in a row of its own. Returns (input_ids, position_ids, mask
    of shape (rows, 1, width, width) in ``dtype``, each row's answer spans [(start, end), ...])."""
    import torch

    width = max(len(prompt) + sum(len(a) for a in answers) for prompt, answers in groups)
    n = len(groups)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    positions = torch.zeros((n, width), dtype=torch.long, device=device)
    allowed = torch.zeros((n, width, width), dtype=torch.bool, device=device)
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    spans = []
    for i, (prompt, answers) in enumerate(groups):
        p = len(prompt)
        ids[i, :p] = torch.tensor(prompt, dtype=torch.long)
        positions[i, :p] = torch.arange(p)
        allowed[i, :p, :p] = causal[:p, :p]
        start, row = p, []
        for answer in answers:
            end = start + len(answer)
            ids[i, start:end] = torch.tensor(answer, dtype=torch.long)
            positions[i, start:end] = torch.arange(p, p + len(answer))
            allowed[i, start:end, :p] = True
            allowed[i, start:end, start:end] = causal[: end - start, : end - start]
            row.append((start, end))
            start = end
        allowed[i, start:, start:] = torch.eye(width - start, dtype=torch.bool, device=device)  # padding: itself only
        spans.append(row)
    mask = torch.zeros((n, 1, width, width), dtype=dtype, device=device).masked_fill(~allowed.unsqueeze(1),
                                                                                     torch.finfo(dtype).min)
    return ids, positions, mask, spans


def float_dtype(model):
    """The dtype of ``model``'s weights, float32 for quantized ones (the attention mask's dtype)."""
    import torch

    dtype = next(model.parameters()).dtype
    return dtype if dtype.is_floating_point else torch.float32


def pair_logps(model, inputs, per_token: bool = False):
    """``completion_logps`` of a batch of pairs (n chosen rows, then n rejected), each pair's
    prompt computed once; falls back to ``completion_logps`` when a pair's rows differ
    before their answers."""
    import torch

    split = _split(inputs)
    if split is None:
        return completion_logps(model, inputs, per_token)
    ids = inputs["input_ids"]
    n, device = len(split), ids.device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    groups = [(ids[i, :p].tolist(), [ids[i, p : p + c].tolist(), ids[i + n, p : p + r].tolist()])
              for i, (p, c, r) in enumerate(split)]
    packed, positions, mask, spans = packed_rows(groups, 0, float_dtype(base), device)
    sources, targets, owners = [], [], []
    for i, ((p, _, _), row) in enumerate(zip(split, spans)):
        for side, (start, end) in enumerate(row):
            # token k of an answer is predicted from the position before it; its first token
            # from the prompt's end (p - 1), as in the answer's own row
            sources += [(i, p - 1)] + [(i, start + k - 1) for k in range(1, end - start)]
            targets += packed[i, start:end].tolist()
            owners += [i + side * n] * (end - start)
    hidden = base.model(input_ids=packed, attention_mask=mask, position_ids=positions,
                        use_cache=False).last_hidden_state
    rows, cols = (torch.tensor(x, device=device) for x in zip(*sources))
    logits = base.lm_head(hidden[rows, cols]).float()
    token_logps = -torch.nn.functional.cross_entropy(logits, torch.tensor(targets, device=device), reduction="none")
    order = torch.tensor(owners, device=device)
    sums = torch.zeros(2 * n, dtype=token_logps.dtype, device=device).index_add(0, order, token_logps)
    counts = torch.tensor([c for _, c, _ in split] + [r for _, _, r in split], device=device)
    return (sums, counts) if per_token else sums
