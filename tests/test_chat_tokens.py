"""The assistant-only loss mask on SmolLM2's real chat template."""

import pytest

from train.chat_tokens import IGNORE, TemplateError, tokenize_chat, with_system

CONVERSATION = [
    {"role": "user", "content": "My chemistry midterm is Thursday and I haven't opened chapter 6."},
    {"role": "assistant", "content": "Then today is chapter 6 day. Open the book now."},
    {"role": "user", "content": "Okay. Then what?"},
    {"role": "assistant", "content": "Practice exam tomorrow. Review mistakes Wednesday. Go."},
]


def labelled_runs(tok):
    """Consecutive runs of labelled token ids."""
    runs, current = [], []
    for token, label in zip(tok.input_ids, tok.labels):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "a kept label must equal its input id"
            current.append(label)
    if current:
        runs.append(current)
    return runs


def test_only_answers_and_their_end_token_carry_labels(tokenizer):
    messages = with_system(CONVERSATION, "You are Teto.")
    tok = tokenize_chat(tokenizer, messages)
    assert tok.input_ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    runs = labelled_runs(tok)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for run, answer in zip(runs, answers):
        assert run[-1] == eot, "the end-of-turn token is trained, so the model learns to stop"
        assert tokenizer.decode(run[:-1]) == answer, "every answer token is kept"
    # Nothing from the system prompt, user turns or role headers is labelled.
    n_answer = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    assert tok.n_answer_tokens == n_answer
    assert tok.labels[0] == IGNORE


def test_persona_system_prompt_is_prepended_only_when_missing():
    own = [{"role": "system", "content": "custom"}] + CONVERSATION
    assert with_system(CONVERSATION, "You are Teto.")[0] == {"role": "system", "content": "You are Teto."}
    assert with_system(own, "You are Teto.")[0]["content"] == "custom"


def test_template_that_does_not_render_incrementally_is_refused(tokenizer):
    class Reordering:
        """A template that puts the last message first breaks the prefix property."""

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = "".join(f"<{m['role']}>{m['content']}" for m in reversed(messages))
            return text + ("<assistant>" if add_generation_prompt else "")

    with pytest.raises(TemplateError):
        tokenize_chat(Reordering(), CONVERSATION)
