"""Continuous batching for the embedded engine: one decode loop, many requests.

One background thread owns the model. Every iteration it admits waiting
sequences (prefilled together, then merged into the running batch's KV cache
by left-padding), runs ONE decode step for every running sequence at once, and
drops finished or cancelled rows from the cache. Rows may use different LoRA
adapters: peft's mixed-adapter batches route each row through its own adapter
(``adapter_names``). Adapter loads and unloads run between steps, and an
unload waits until no running row uses the adapter.

Results go back to asyncio callers through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float = 1.0  # vLLM's: over the prompt's and the answer's tokens; 1 is off


@dataclass
class Event:
    """What the engine reports for one sequence: new text, or the end."""
    index: int
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


class Request:
    """A chat request: ``n`` sequences sharing a prompt and an adapter."""

    def __init__(self, prompt_ids: list[int], adapter: str | None, sampling: Sampling, n: int,
                 loop: asyncio.AbstractEventLoop):
        self.prompt_ids = prompt_ids
        self.adapter = adapter or BASE
        self.sampling = sampling
        self.n = n
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = loop
        self.cancelled = threading.Event()

    def emit(self, event: Event) -> None:
        self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Row:
    request: Request
    index: int
    generator: object  # torch.Generator or None
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    done: bool = False


class Batcher:
    """The decode loop. ``model`` is a causal LM (a PeftModel once adapters load)."""

    def __init__(self, model, tokenizer, eos_ids: set[int], max_batch: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_batch = max_batch
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._commands: queue.Queue[tuple[Callable, asyncio.Future, asyncio.AbstractEventLoop]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._rows: list[Row] = []
        self.peak_rows = 0  # most rows decoded in one step (shows that batching happens)
        self._state = None  # (cache, attention_mask, last_tokens)
        self._pending_unloads: list[tuple[str, Callable, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self.thread = threading.Thread(target=self._run, name="engine-batcher", daemon=True)

    # ---- called from the event loop -------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=10)

    def submit(self, request: Request) -> None:
        self._waiting.put(request)
        self._wake.set()

    async def call(self, fn: Callable, *, wait_for_adapter: str | None = None):
        """Run ``fn()`` on the engine thread between decode steps; with
        ``wait_for_adapter``, only once no running row uses that adapter."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if wait_for_adapter:
            self._commands.put((lambda: self._pending_unloads.append((wait_for_adapter, fn, future, loop)),
                                loop.create_future(), loop))
        else:
            self._commands.put((fn, future, loop))
        self._wake.set()
        return await future

    @property
    def running(self) -> int:
        return len(self._rows)

    def adapters_in_use(self) -> set[str]:
        return {r.request.adapter for r in self._rows}

    # ---- engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._run_commands()
            admitted = self._admit()
            if not self._rows and not admitted:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                if admitted:
                    self._prefill(admitted)
                if self._rows:  # every row may have finished at its first token (max_tokens 1, an EOS)
                    self._step()
            except Exception as exc:  # a bug must not kill the loop: fail the rows, keep serving
                log.exception("decode step failed")
                failed = self._rows + [r for r in admitted if r not in self._rows]  # admitted: maybe not in yet
                for row in failed:
                    row.request.emit(Event(row.index, finish_reason="abort", text=f"[engine error: {exc}]"))
                self._rows, self._state = [], None

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future, loop = self._commands.get_nowait()
            except queue.Empty:
                break
            _resolve(fn, future, loop)
        in_use = self.adapters_in_use()
        still = []
        for name, fn, future, loop in self._pending_unloads:
            if name in in_use:
                still.append((name, fn, future, loop))
            else:
                _resolve(fn, future, loop)
        self._pending_unloads = still

    def _admit(self) -> list[Row]:
        import torch

        rows: list[Row] = []
        while len(self._rows) + len(rows) < self.max_batch:
            try:
                request = self._waiting.get_nowait()
            except queue.Empty:
                break
            if request.cancelled.is_set():
                continue
            for i in range(request.n):
                gen = None
                if request.sampling.seed is not None:
                    gen = torch.Generator().manual_seed(request.sampling.seed + i)
                rows.append(Row(request, i, gen))
        return rows

    def _prefill(self, rows: list[Row]) -> None:
        """Run the prompts of new rows, then merge them into the running batch."""
        import torch
        from transformers import DynamicCache

        width = max(len(r.request.prompt_ids) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            p = r.request.prompt_ids
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        cache = DynamicCache()
        logits = self._forward(ids, mask, cache, [r.request.adapter for r in rows])
        new_tokens = self._sample(logits, rows)
        if self._state is None:
            self._rows = rows
            self._state = (cache, mask, new_tokens)
        else:
            self._merge(rows, cache, mask, new_tokens)
        self._deliver(rows, new_tokens)

    def _merge(self, rows, cache, mask, new_tokens) -> None:
        import torch

        old_cache, old_mask, old_tokens = self._state
        length = max(old_mask.shape[1], mask.shape[1])

        def left_pad(t, dim_len, dim):
            extra = length - dim_len
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old_layer, new_layer in zip(old_cache.layers, cache.layers):
            old_layer.keys = torch.cat([left_pad(old_layer.keys, old_mask.shape[1], 2),
                                        left_pad(new_layer.keys, mask.shape[1], 2)], 0)
            old_layer.values = torch.cat([left_pad(old_layer.values, old_mask.shape[1], 2),
                                          left_pad(new_layer.values, mask.shape[1], 2)], 0)
        merged_mask = torch.cat([left_pad(old_mask, old_mask.shape[1], 1), left_pad(mask, mask.shape[1], 1)], 0)
        self._rows = self._rows + rows
        self._state = (old_cache, merged_mask, torch.cat([old_tokens, new_tokens], 0))

    def _step(self) -> None:
        import torch

        self.peak_rows = max(self.peak_rows, len(self._rows))
        cache, mask, tokens = self._state
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
        logits = self._forward(tokens[:, None], mask, cache, [r.request.adapter for r in self._rows])
        new_tokens = self._sample(logits, self._rows)
        self._state = (cache, mask, new_tokens)
        self._deliver(self._rows, new_tokens)

    def _forward(self, ids, mask, cache, adapters):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
        if not hasattr(self.model, "peft_config"):
            return self.model(**kwargs).logits[:, -1].float()
        kinds = set(adapters)
        if kinds == {BASE}:
            with self.model.disable_adapter():
                return self.model(**kwargs).logits[:, -1].float()
        if len(kinds) == 1:
            # One adapter for every row: peft's plain path is about 25% faster
            # than its mixed-batch path (measured at batch 16).
            (name,) = kinds
            if self.model.active_adapter != name:
                self.model.set_adapter(name)
            return self.model(**kwargs).logits[:, -1].float()
        # Mixed batch: name each row's adapter (base rows included).
        return self.model(adapter_names=adapters, **kwargs).logits[:, -1].float()

    def _sample(self, logits, rows):
        import torch

        for i, r in enumerate(rows):
            if r.request.sampling.repetition_penalty != 1.0:
                logits[i] = repetition_penalized(logits[i], r.request.prompt_ids + r.ids,
                                                 r.request.sampling.repetition_penalty)
        out = logits.argmax(-1)  # greedy rows keep this; sampled rows are redrawn below
        for i, r in enumerate(rows):
            s = r.request.sampling
            if s.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / s.temperature, -1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < s.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            out[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return out

    def _deliver(self, rows, new_tokens) -> None:
        """Append each row's token, emit new text, and drop finished rows."""
        for row, token in zip(rows, new_tokens.tolist()):
            finish = None
            if row.request.cancelled.is_set():
                finish = "abort"
            elif token in self.eos_ids:
                finish = "stop"
            else:
                row.ids.append(token)
            text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            s = row.request.sampling
            if finish is None:
                cut = _find_stop(text, s.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                elif len(row.ids) >= s.max_tokens:
                    finish = "length"
            ready = len(text.rstrip(BROKEN)) if finish else _safe_length(text, s.stop)
            delta = text[row.sent:ready]
            row.sent = max(row.sent, ready)
            if delta or finish:
                row.request.emit(Event(row.index, delta, finish, len(row.ids)))
            row.done = finish is not None
        if any(r.done for r in self._rows):
            self._drop_finished()

    def _drop_finished(self) -> None:
        import torch

        keep = [i for i, r in enumerate(self._rows) if not r.done]
        if not keep:
            self._rows, self._state = [], None
            return
        cache, mask, tokens = self._state
        index = torch.tensor(keep)
        cache.batch_select_indices(index)
        mask, tokens = mask[index], tokens[index]
        # Drop columns that are padding for every remaining row.
        lead = int((mask.cumsum(-1) == 0).sum(-1).min())
        if lead:
            mask = mask[:, lead:]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        self._rows = [self._rows[i] for i in keep]
        self._state = (cache, mask, tokens)


def repetition_penalized(logits, seen: list[int], penalty: float):
    """vLLM's (and transformers') repetition penalty on one row of logits: each token in
    ``seen`` (the prompt's and the answer's so far) has its logit divided by ``penalty`` when
    positive and multiplied by it when negative, so a penalty above 1 makes it less likely."""
    import torch

    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    if not ids.numel():
        return logits
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def _resolve(fn, future, loop) -> None:
    try:
        result = fn()
    except Exception as exc:  # handed to the awaiting caller
        loop.call_soon_threadsafe(_set, future, None, exc)
    else:
        loop.call_soon_threadsafe(_set, future, result, None)


def _set(future, result, exc) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


# What the tokenizer decodes an incomplete UTF-8 character into: one per byte with byte-fallback
# tokens (Gemma's "<0xEB>", "<0x98>" are "\ufffd\ufffd" until "<0xA0>" completes "똠"), one
# for a byte-level BPE token that ends mid-character (SmolLM2).
BROKEN = "\ufffd"


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be sent: hold back a tail that may begin a stop
    sequence, and an incomplete UTF-8 character (all its bytes so far)."""
    end = len(text.rstrip(BROKEN))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end
