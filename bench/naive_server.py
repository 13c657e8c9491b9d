"""A naive chat server for comparison: one request at a time with ``model.generate``.

This is what a first prototype looks like (a lock around ``generate`` and a
token streamer); ``persona bench serve`` measures the embedded engine against
it. It speaks just enough of the streaming chat API for the benchmark.
"""

from __future__ import annotations

import asyncio
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from serve.engine.embedded import sse


def create_naive_app(model_path: str, adapters: dict[str, str]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    from serve.engine.embedded import pick_dtype

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # The same weights and dtypes as the embedded engine, so only the serving differs.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=pick_dtype("auto", "cpu")).eval()
    if adapters:
        from peft import PeftModel

        names = list(adapters)
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0],
                                          autocast_adapter_dtype=False)
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name, autocast_adapter_dtype=False)
    class CountingStreamer(TextIteratorStreamer):
        """Counts generated tokens as the engine does: the prompt and the end-of-turn token are not."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.prompt_seen, self.generated = False, 0

        def put(self, value):
            if self.prompt_seen:
                self.generated += int((value != tokenizer.eos_token_id).sum())
            self.prompt_seen = True
            super().put(value)

    lock = threading.Lock()
    app = FastAPI()

    def generate(body: dict, streamer) -> None:
        with lock, torch.no_grad():
            if adapters:
                model.set_adapter(body["model"])
            inputs = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
            model.generate(**inputs, max_new_tokens=body.get("max_tokens", 64), do_sample=False,
                           streamer=streamer, pad_token_id=tokenizer.eos_token_id)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        body = await raw.json()
        streamer = CountingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        threading.Thread(target=generate, args=(body, streamer), daemon=True).start()

        async def events():
            created = int(time.time())
            iterator = iter(streamer)
            while True:
                text = await asyncio.to_thread(next, iterator, None)
                if text is None:
                    break
                yield sse({"id": "naive", "object": "chat.completion.chunk", "created": created,
                           "model": body["model"], "choices": [{"index": 0, "delta": {"content": text}}]})
            yield sse({"id": "naive", "object": "chat.completion.chunk", "created": created, "model": body["model"],
                       "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": streamer.generated,
                                                "total_tokens": streamer.generated}})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
