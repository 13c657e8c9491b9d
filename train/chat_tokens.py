"""Tokenize a conversation with the model's own chat template, labelling only
the assistant's tokens.

For each assistant message, the text the template renders for the history
with a generation prompt is a prefix of the text it renders with the answer
included; the characters in between are the answer plus its end-of-turn
marker (trailing whitespace is not part of the answer). Tokens inside those
spans keep their ids as labels; every other token is labelled -100. This
works with any template that renders conversations incrementally (ChatML,
Llama 3, Gemma, ...), without `{% generation %}` markers in the template.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


class TemplateError(ValueError):
    pass


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend the persona's system prompt unless the conversation has its own."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the (start, end) character spans of assistant answers."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not upto.startswith(prefix) or not text.startswith(upto):
            raise TemplateError("the chat template does not render conversations incrementally")
        end = len(upto.rstrip())
        spans.append((len(prefix), end))
    return text, spans


def tokenize_chat(tokenizer, messages: list[dict]) -> Tokenized:
    """Token ids and labels (-100 outside assistant answers) for one conversation."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (start, end) in zip(ids, offsets):
        inside = any(s <= start and end <= e for s, e in spans) and end > start
        labels.append(tok if inside else IGNORE)
    return Tokenized(input_ids=list(ids), labels=labels)
