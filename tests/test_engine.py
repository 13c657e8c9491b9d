"""The embedded engine over HTTP, through the official openai client: vLLM's
protocol, continuous batching across adapters, runtime LoRA loading."""

import asyncio
import time

import httpx
import openai
import pytest

from serve.processes import serve_in_thread
from conftest import assert_stop_sequence_cuts, make_lora


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_lora(tiny_model_dir, root / name, 100 + i) for i, name in enumerate(["alpha", "beta"])}


@pytest.fixture(scope="module")
def engine_url(tiny_model_dir):
    from serve.engine.embedded import EmbeddedEngine
    from serve.engine.routes import create_app

    engine = EmbeddedEngine(str(tiny_model_dir), served_name="base", max_model_len=256)
    url, server = serve_in_thread(create_app(engine))
    yield url
    server.should_exit = True


@pytest.fixture
def client(engine_url):
    return openai.OpenAI(base_url=engine_url + "/v1", api_key="unused")


def ask(client, model="base", content="hello there", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_plain_completion(client):
    assert [m.id for m in client.models.list().data][0] == "base"
    reply = ask(client)
    assert reply.id.startswith("chatcmpl-") and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5
    assert ask(client).choices[0].message.content == reply.choices[0].message.content, "greedy is deterministic"


def test_streaming_with_usage_in_last_chunk(client):
    whole = ask(client, max_tokens=10).choices[0].message.content
    chunks = list(ask(client, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)


def test_n_and_seed(client):
    reply = ask(client, n=2, temperature=1.0, seed=7, max_tokens=8)
    assert [c.index for c in reply.choices] == [0, 1]
    again = ask(client, n=2, temperature=1.0, seed=7, max_tokens=8)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]


def test_stop_sequence_cuts_the_answer(client):
    assert_stop_sequence_cuts(lambda **kw: ask(client, **kw))


def test_errors_use_openai_shape(client, engine_url):
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, model="nobody")
    assert err.value.body["message"] == "The model `nobody` does not exist." or "nobody" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens"):
        ask(client, content="word " * 300)
    bad = httpx.post(engine_url + "/v1/chat/completions", json={"model": "base", "messages": [], "n": 99})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


def test_lora_load_unload_and_duplicates(client, engine_url, adapters):
    post = lambda route, body: httpx.post(engine_url + route, json=body)  # noqa: E731
    assert post("/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": adapters["alpha"]}).status_code == 200
    dup = post("/v1/load_lora_adapter", {"lora_name": "alpha", "lora_path": adapters["alpha"]})
    assert dup.status_code == 400 and "already been loaded" in dup.json()["error"]["message"]
    missing = post("/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "/nowhere"})
    assert missing.status_code == 404
    assert "alpha" in [m.id for m in client.models.list().data]
    base, alpha = ask(client).choices[0].message.content, ask(client, model="alpha").choices[0].message.content
    assert base != alpha, "the adapter changes the answer"
    assert post("/v1/unload_lora_adapter", {"lora_name": "alpha"}).status_code == 200
    assert post("/v1/unload_lora_adapter", {"lora_name": "alpha"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        ask(client, model="alpha")


def test_concurrent_mixed_adapter_batch_matches_solo_answers(engine_url, adapters):
    """Requests for different adapters share decode steps and still get their own answers."""
    for name in ("alpha", "beta"):
        httpx.post(engine_url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": adapters[name]})
    sync = openai.OpenAI(base_url=engine_url + "/v1", api_key="x")
    prompts = [("base", "hi"), ("alpha", "tell me a story"), ("beta", "what now?"), ("alpha", "ok")] * 2
    solo = [ask(sync, m, p, max_tokens=16).choices[0].message.content for m, p in prompts]

    async def together():
        aclient = openai.AsyncOpenAI(base_url=engine_url + "/v1", api_key="x")
        calls = [aclient.chat.completions.create(model=m, messages=[{"role": "user", "content": p}],
                                                 max_tokens=16, temperature=0) for m, p in prompts]
        return [r.choices[0].message.content for r in await asyncio.gather(*calls)]

    assert asyncio.run(together()) == solo
    assert httpx.get(engine_url + "/health").json()["peak_batch"] > 1
    for name in ("alpha", "beta"):
        httpx.post(engine_url + "/v1/unload_lora_adapter", json={"lora_name": name})


def test_disconnected_stream_stops_generation(engine_url):
    body = {"model": "base", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", engine_url + "/v1/chat/completions", json=body) as response:
        for _ in zip(range(3), response.iter_lines()):
            pass
    for _ in range(50):
        if httpx.get(engine_url + "/health").json()["running"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(engine_url + "/health").json()["running"] == 0


def test_rows_that_finish_at_their_first_token_leave_the_engine_serving(client, engine_url, caplog):
    """An idle engine admits only rows that end at their first token (max_tokens 1): the
    batch is then empty before any decode step, and the next requests are served."""
    import logging

    with caplog.at_level(logging.ERROR, logger="serve.engine.batching"):
        for _ in range(3):
            reply = ask(client, max_tokens=1)
            assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 1
    assert not [r for r in caplog.records if "decode step failed" in r.getMessage()]
    assert ask(client, max_tokens=4).usage.completion_tokens >= 1
    assert httpx.get(engine_url + "/health").json()["running"] == 0


def test_repetition_penalty_has_vllm_semantics():
    """Seen tokens: a positive logit is divided by the penalty, a negative one multiplied."""
    import torch

    from serve.engine.batching import repetition_penalized

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = repetition_penalized(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0] and logits.tolist() == [2.0, -1.0, 0.5, 3.0]
    assert repetition_penalized(logits, [], 2.0).tolist() == logits.tolist()


def test_repetition_penalty_answers_as_transformers_generate(client, tiny_model_dir):
    """Greedy with repetition_penalty gives transformers' greedy answer with the same penalty
    (the same rule: over the prompt's and the answer's tokens), and not the unpenalised one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "hello there"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def reference(penalty):
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False, repetition_penalty=penalty,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    penalised = ask(client, max_tokens=12, extra_body={"repetition_penalty": 1.5}).choices[0].message.content
    plain = ask(client, max_tokens=12).choices[0].message.content
    assert penalised == reference(1.5) and plain == reference(1.0)
    assert penalised != plain
