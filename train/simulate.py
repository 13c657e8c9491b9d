"""``persona simulate``: drive the real loop through the public API with a scripted rater.

Each round: for ``pairs_per_round`` prompts, ask the persona twice (sampled),
let the rater pick, post the comparison; then retrain (through the gateway)
and measure, on held-out prompts, how often the rater prefers the active
version's answer to the original version's (ties count half).

    persona simulate --rater train.raters:shorter --persona teto --rounds 3 --pairs-per-round 64
"""

from __future__ import annotations

import importlib
import json
import random
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from feedback.errors import UserError
from train.loop import GatewayClient, bearer

console = Console()


def load_rater(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"--rater {spec!r}: expected MODULE:FUNCTION, e.g. train.raters:shorter")
    try:
        rater = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"--rater {spec!r}: {exc}") from None
    if not callable(rater):
        raise UserError(f"--rater {spec!r} is not a function")
    return rater


def persona_prompts(persona: str, split: str) -> list[str]:
    """First user messages of the persona's dialogues (train or held-out files)."""
    from train.data import load_files
    from train.personas import load_persona

    info = load_persona(persona)
    files = [(info.resolve(f.path), f.language) for f in info.files(split, ["en"])]
    prompts = [next(m["content"] for m in e.messages if m["role"] == "user") for e in load_files(files, ["en"])]
    return list(dict.fromkeys(prompts))


class Api:
    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=600)
        self.api = bearer("PERSONA_API_KEY")
        self.admin = GatewayClient(url)

    def ask(self, model: str, prompt: str, max_tokens: int, temperature: float, seed: int | None = None) -> dict:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": temperature, **({"seed": seed} if seed is not None else {})}
        r = self.http.post("/v1/chat/completions", json=body, headers=self.api)
        if r.status_code != 200:
            raise UserError(f"the gateway refused a chat ({r.status_code}): {r.text[:200]}")
        return r.json()

    def compare(self, turn_a: str, turn_b: str, choice: str, left: str) -> None:
        r = self.http.post("/v1/comparisons", json={"turn_a": turn_a, "turn_b": turn_b, "choice": choice,
                                                    "left": left}, headers=self.api)
        if r.status_code != 200:
            raise UserError(f"the gateway refused a comparison ({r.status_code}): {r.text[:200]}")

    def retrain(self, persona: str, timeout: float) -> dict:
        started = self.admin.retrain(persona, force=True)
        return self.admin.wait_for_run(persona, started["asked"], timeout)

    def active_version(self, persona: str) -> int:
        reply = self.ask(persona, "hi", 1, 0.0)
        return int(reply["model"].split("@v")[1])


def _text(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def preference_rate(api: Api, rater, persona: str, original: int, prompts: list[str], max_tokens: int,
                    workers: int = 8) -> float:
    """How often the rater prefers the active version's greedy answer to the original's."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        i, prompt = item
        new = _text(api.ask(persona, prompt, max_tokens, 0.0))
        old = _text(api.ask(f"{persona}@v{original}", prompt, max_tokens, 0.0))
        a_is_new = i % 2 == 0  # alternate positions: the rater sees no fixed order
        verdict = rater(prompt, new, old) if a_is_new else rater(prompt, old, new)
        return 0.5 if verdict == "tie" else float((verdict == "a") == a_is_new)

    with ThreadPoolExecutor(workers) as pool:
        scores = list(pool.map(one, enumerate(prompts)))
    return sum(scores) / max(len(scores), 1)


def main(args) -> None:
    rater = load_rater(args.rater)
    api = Api(args.gateway)
    prompts = (json.loads(Path(args.prompts).read_text()) if args.prompts and args.prompts.endswith(".json")
               else Path(args.prompts).read_text().splitlines() if args.prompts else persona_prompts(args.persona, "train"))
    heldout = persona_prompts(args.persona, "heldout")[: args.heldout]
    if not prompts or not heldout:
        raise UserError(f"{args.persona} has no prompts to ask (train) or to measure on (held-out)")
    rng = random.Random(args.seed)
    original = api.active_version(args.persona)
    table = Table("round", "comparisons", "a / b / tie", "run", "status", "served", "reward acc.",
                  "preferred over original", title=f"{args.persona}: rater {args.rater}")
    start_rate = preference_rate(api, rater, args.persona, original, heldout, args.max_tokens, args.workers)
    table.add_row("0", "-", "-", "-", "-", f"v{original}", "-", f"{start_rate:.0%}")
    started = time.monotonic()
    for round_no in range(1, args.rounds + 1):
        counts = {"a": 0, "b": 0, "tie": 0}
        jobs = [(rng.choice(prompts), rng.randrange(1 << 30), rng.randrange(1 << 30), rng.choice("ab"))
                for _ in range(args.pairs_per_round)]

        def rate_one(job):
            prompt, seed_one, seed_two, left = job
            one = api.ask(args.persona, prompt, args.max_tokens, args.temperature, seed_one)
            two = api.ask(args.persona, prompt, args.max_tokens, args.temperature, seed_two)
            shown = (one, two) if left == "a" else (two, one)
            verdict = rater(prompt, *(_text(s) for s in shown))
            choice = verdict if verdict == "tie" or left == "a" else ("b" if verdict == "a" else "a")
            api.compare(one["id"], two["id"], choice, left)
            return verdict

        from concurrent.futures import ThreadPoolExecutor

        with Progress(console=console, transient=True) as progress, ThreadPoolExecutor(args.workers) as pool:
            task = progress.add_task(f"round {round_no}: asking and rating", total=args.pairs_per_round)
            for verdict in pool.map(rate_one, jobs):
                counts[verdict] += 1
                progress.advance(task)
        run = api.retrain(args.persona, args.timeout)
        rate = preference_rate(api, rater, args.persona, original, heldout, args.max_tokens, args.workers)
        served = api.active_version(args.persona)
        accuracy = run.get("reward_accuracy")
        table.add_row(str(round_no), str(args.pairs_per_round), f"{counts['a']} / {counts['b']} / {counts['tie']}",
                      run["id"], run["status"], f"v{served}", "-" if accuracy is None else f"{accuracy:.0%}",
                      f"{rate:.0%}")
        console.print(table)
    console.print(f"{args.rounds} rounds in {(time.monotonic() - started) / 60:.1f} min")


def add_arguments(p) -> None:
    p.add_argument("--rater", required=True, help="MODULE:FUNCTION, (prompt, answer_a, answer_b) -> a|b|tie")
    p.add_argument("--persona", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs-per-round", type=int, default=64)
    p.add_argument("--prompts", help="prompts to ask (a .txt file, one a line, or a .json list); "
                                     "default: the persona's training prompts")
    p.add_argument("--heldout", type=int, default=32, help="held-out prompts to measure on")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=8, help="concurrent requests (the engine batches them)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a retrain may take")
    p.add_argument("--gateway", default="http://127.0.0.1:7860")
    p.set_defaults(func=main)
