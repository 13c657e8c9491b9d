"""``persona simulate``: drive the real loop through the public API with scripted raters.

Each round: for ``pairs_per_round`` prompts, every rater asks the persona twice
(sampled, with the same seeds for every rater, so that they judge the same answers),
picks one, and posts the comparison; then retrain (through the gateway) and measure,
on held-out prompts, how often each rater prefers the active version's answer to the
original version's (ties count half).

Several raters vote as several voters: each posts with its own API key (a voter is
the key's fingerprint). The keys of ``PERSONA_API_KEY`` are dealt to the raters in
turn, so each has one at least; with more keys than raters, a rater spreads its pairs
evenly over its keys (several voters of one taste: enough voters for ``min_voters``).
``--flip P`` makes every rater noisy: each of its verdicts is turned round with
probability P (a tie stays a tie). So the pair builder's agreement figures and its
outlier rule can be watched on raters of known tastes.

    persona simulate --rater train.raters:shorter --persona teto --rounds 3 --pairs-per-round 64
    PERSONA_API_KEY=k1,k2 persona simulate --rater train.raters:shorter --rater train.raters:asks_back \
        --flip 0.2 --persona teto
"""

from __future__ import annotations

import importlib
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from feedback import settings
from feedback.errors import UserError
from train.loop import GatewayClient

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


@dataclass
class Rater:
    spec: str
    judge: Callable[[str, str, str], str]
    keys: list[dict]     # Authorization headers of its API keys: each one a voter of its own

    @property
    def headers(self) -> dict:
        return self.keys[0]


def rater_keys(count: int) -> list[list[dict]]:
    """The Authorization headers of each rater: the keys of PERSONA_API_KEY dealt in turn
    (rater i gets keys i, i + count, ...). A single rater may go without a key (a loopback
    client of a gateway that has none)."""
    keys = list(settings.get("PERSONA_API_KEY"))
    if count == 1 and not keys:
        return [[{}]]
    if len(keys) < count:
        raise UserError(f"{count} raters vote as {count} voters at least, one API key each, but PERSONA_API_KEY "
                        f"has {len(keys)}: give it {count} keys or more, comma-separated (the gateway must "
                        "accept them)")
    return [[{"Authorization": f"Bearer {key}"} for key in keys[i::count]] for i in range(count)]


def load_raters(specs: list[str]) -> list[Rater]:
    return [Rater(spec, load_rater(spec), keys) for spec, keys in zip(specs, rater_keys(len(specs)))]


def flip(verdict: str) -> str:
    return {"a": "b", "b": "a"}.get(verdict, verdict)


MAX_QUOTA_WAITS = 100  # a simulated voter over the vote quota waits its Retry-After this often at most


class Api:
    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=600)
        self.admin = GatewayClient(url)

    def ask(self, model: str, prompt: str, max_tokens: int, temperature: float, seed: int | None = None,
            headers: dict | None = None) -> dict:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": temperature, **({"seed": seed} if seed is not None else {})}
        r = self.http.post("/v1/chat/completions", json=body, headers=headers or {})
        if r.status_code != 200:
            raise UserError(f"the gateway refused a chat ({r.status_code}): {r.text[:200]}")
        return r.json()

    def compare(self, turn_a: str, turn_b: str, choice: str, left: str, headers: dict) -> None:
        body = {"turn_a": turn_a, "turn_b": turn_b, "choice": choice, "left": left}
        r = self.http.post("/v1/comparisons", json=body, headers=headers)
        for _ in range(MAX_QUOTA_WAITS):  # over the voter's vote quota: wait as told, then vote again
            if r.status_code != 429:
                break
            time.sleep(float(r.headers.get("Retry-After", "1")))
            r = self.http.post("/v1/comparisons", json=body, headers=headers)
        if r.status_code != 200:
            raise UserError(f"the gateway refused a comparison ({r.status_code}): {r.text[:200]}")

    def retrain(self, persona: str, timeout: float) -> dict:
        started = self.admin.retrain(persona, force=True)
        return self.admin.wait_for_run(persona, started["asked"], timeout)

    def active_version(self, persona: str, headers: dict) -> int:
        reply = self.ask(persona, "hi", 1, 0.0, headers=headers)
        return int(reply["model"].split("@v")[1])


def _text(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def preference_rates(api: Api, raters: list[Rater], persona: str, original: int, prompts: list[str],
                     max_tokens: int, workers: int = 8) -> list[float]:
    """For each rater, how often it prefers the active version's greedy answer to the original's
    (its own taste, without --flip's noise)."""
    headers = raters[0].headers

    def one(item):
        i, prompt = item
        new = _text(api.ask(persona, prompt, max_tokens, 0.0, headers=headers))
        old = _text(api.ask(f"{persona}@v{original}", prompt, max_tokens, 0.0, headers=headers))
        a_is_new = i % 2 == 0  # alternate positions: the rater sees no fixed order
        scores = []
        for rater in raters:
            verdict = rater.judge(prompt, new, old) if a_is_new else rater.judge(prompt, old, new)
            scores.append(0.5 if verdict == "tie" else float((verdict == "a") == a_is_new))
        return scores

    with ThreadPoolExecutor(workers) as pool:
        scores = list(pool.map(one, enumerate(prompts)))
    return [sum(s[r] for s in scores) / max(len(scores), 1) for r in range(len(raters))]


def rate_round(api: Api, raters: list[Rater], args, rng: random.Random, round_no: int) -> dict[str, int]:
    """One round of comparisons: each job (prompt, two seeds, which is left) asked and judged by
    every rater; returns the verdicts posted, counted."""
    jobs = [(rng.choice(args.prompts_list), rng.randrange(1 << 30), rng.randrange(1 << 30), rng.choice("ab"))
            for _ in range(args.pairs_per_round)]
    work = [(job, rater, rater.keys[j % len(rater.keys)], rng.random() < args.flip)
            for j, job in enumerate(jobs) for rater in raters]  # a rater's pairs spread evenly over its keys

    def rate_one(item):
        (prompt, seed_one, seed_two, left), rater, headers, flipped = item
        one = api.ask(args.persona, prompt, args.max_tokens, args.temperature, seed_one, headers)
        two = api.ask(args.persona, prompt, args.max_tokens, args.temperature, seed_two, headers)
        shown = (one, two) if left == "a" else (two, one)
        verdict = rater.judge(prompt, *(_text(s) for s in shown))
        verdict = flip(verdict) if flipped else verdict
        choice = verdict if verdict == "tie" or left == "a" else flip(verdict)
        api.compare(one["id"], two["id"], choice, left, headers)
        return verdict

    counts = {"a": 0, "b": 0, "tie": 0}
    with Progress(console=console, transient=True) as progress, ThreadPoolExecutor(args.workers) as pool:
        task = progress.add_task(f"round {round_no}: asking and rating", total=len(work))
        for verdict in pool.map(rate_one, work):
            counts[verdict] += 1
            progress.advance(task)
    return counts


def _rates(rates: list[float]) -> str:
    return " / ".join(f"{r:.0%}" for r in rates)


def main(args) -> None:
    raters = load_raters(args.rater)
    if not 0 <= args.flip <= 1:
        raise UserError(f"--flip {args.flip}: a probability, between 0 and 1")
    api = Api(args.gateway)
    args.prompts_list = (json.loads(Path(args.prompts).read_text()) if args.prompts and args.prompts.endswith(".json")
                         else Path(args.prompts).read_text().splitlines() if args.prompts
                         else persona_prompts(args.persona, "train"))
    heldout = persona_prompts(args.persona, "heldout")[: args.heldout]
    if not args.prompts_list or not heldout:
        raise UserError(f"{args.persona} has no prompts to ask (train) or to measure on (held-out)")
    rng = random.Random(args.seed)
    original = api.active_version(args.persona, raters[0].headers)
    names = ", ".join(r.spec for r in raters) + (f", verdicts flipped with p={args.flip:g}" if args.flip else "")
    table = Table("round", "comparisons", "a / b / tie", "run", "status", "served", "reward acc.",
                  "preferred over original" + (" (each rater)" if len(raters) > 1 else ""),
                  title=f"{args.persona}: {'raters' if len(raters) > 1 else 'rater'} {names}")
    start = preference_rates(api, raters, args.persona, original, heldout, args.max_tokens, args.workers)
    table.add_row("0", "-", "-", "-", "-", f"v{original}", "-", _rates(start))
    started = time.monotonic()
    for round_no in range(1, args.rounds + 1):
        counts = rate_round(api, raters, args, rng, round_no)
        run = api.retrain(args.persona, args.timeout)
        rates = preference_rates(api, raters, args.persona, original, heldout, args.max_tokens, args.workers)
        served = api.active_version(args.persona, raters[0].headers)
        accuracy = run.get("reward_accuracy")
        table.add_row(str(round_no), str(sum(counts.values())), f"{counts['a']} / {counts['b']} / {counts['tie']}",
                      run["id"], run["status"], f"v{served}", "-" if accuracy is None else f"{accuracy:.0%}",
                      _rates(rates))
        console.print(table)
    console.print(f"{args.rounds} rounds in {(time.monotonic() - started) / 60:.1f} min")


def add_arguments(p) -> None:
    p.add_argument("--rater", required=True, action="append",
                   help="MODULE:FUNCTION, (prompt, answer_a, answer_b) -> a|b|tie; repeat it for several raters. "
                        "Each votes as its own voter, with its own API key: the keys of PERSONA_API_KEY "
                        "(comma-separated, one per rater at least) are dealt to the raters in turn, and a rater "
                        "with several spreads its pairs evenly over them. Every rater judges every pair.")
    p.add_argument("--flip", type=float, default=0.0,
                   help="noise: each verdict of every rater is turned round with this probability (default 0)")
    p.add_argument("--persona", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs-per-round", type=int, default=64, help="pairs asked per round (each judged by every rater)")
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
