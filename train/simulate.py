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

A round's run is the one it asks for (``POST /admin/retrain``, forced); when the
gateway's scheduler has one going already (409), the round waits for that one and
reports it (it starts no second run). ``--promotion gate|ab`` asks the run to promote
at once or through an A/B experiment (default: as the recipe says). A run that ends
as ``challenger`` started an experiment; the raters then play its side-by-side votes
themselves (the active and the challenging version, pinned, one seed each pair) until
the gateway decides it, or stop it after ``--ab-max-votes`` decisive ones, or sooner, once
its chance of promoting within them is below ``--ab-futility`` (``promotion_chance``:
it would end undecided anyway). The table has a row a
round; ``--out FILE.json`` writes the rows as JSON too.

    persona simulate --rater train.raters:shorter --persona teto --rounds 3 --pairs-per-round 64
    PERSONA_API_KEY=k1,k2 persona simulate --rater train.raters:shorter --rater train.raters:asks_back \
        --flip 0.2 --persona teto
    PERSONA_API_KEY=k1,k2 persona simulate --rater train.raters:concrete --rater train.raters:mixed --persona teto \
        --promotion ab --ab-max-votes 400 --out sim.json
"""

from __future__ import annotations

import importlib
import json
import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from feedback import runs
from feedback.abtest import ABRules, promotion_chance
from feedback.errors import UserError
from feedback.keys import configured_keys
from feedback.votes import SIDE_BY_SIDE_TEMPERATURE
from train.loop import GatewayClient, error_code, error_message
from train.timing import Phases

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
    """The Authorization headers of each rater: the keys of PERSONA_API_KEY, then those of
    PERSONA_API_KEY_FILE, dealt in turn (rater i gets keys i, i + count, ...). A single rater
    may go without a key (a loopback client of a gateway that has none)."""
    keys = list(configured_keys("API"))
    if count == 1 and not keys:
        return [[{}]]
    if len(keys) < count:
        raise UserError(f"{count} raters vote as {count} voters at least, one API key each, but PERSONA_API_KEY "
                        f"and PERSONA_API_KEY_FILE have {len(keys)}: give them {count} keys or more (the gateway "
                        "must accept them)")
    return [[{"Authorization": f"Bearer {key}"} for key in keys[i::count]] for i in range(count)]


def load_raters(specs: list[str]) -> list[Rater]:
    return [Rater(spec, load_rater(spec), keys) for spec, keys in zip(specs, rater_keys(len(specs)))]


def flip(verdict: str) -> str:
    return {"a": "b", "b": "a"}.get(verdict, verdict)


MAX_QUOTA_WAITS = 100  # a simulated client told to come back (429, 503) waits its Retry-After this often at most
RUN_POLL_SECONDS = 2.0  # how often the run already going (the scheduler's) is looked at
RESENDS = 3              # a request whose connection closed unanswered is sent again this many times
RESEND_PAUSE = 0.5       # seconds, times the attempt
AB_BATCH = 16           # A/B comparisons played between two looks at the experiment


def version_number(value) -> int:
    """A version as a number: 3, "3", "v3" and "teto-v3" are all 3."""
    match = re.search(r"(\d+)$", str(value))
    if match is None:
        raise UserError(f"the gateway named a version {value!r}, not a number")
    return int(match.group(1))


def resend(http, method: str, path: str, **kw):
    """``http.request``, sent again (up to ``RESENDS`` times) when the connection closed before
    any answer came: a kept-alive connection the server closed as the request went out
    (its idle timer fired first), or one refused for a moment. Nothing was answered, so
    nothing was done twice that matters: a chat asked again is one more logged turn, and a
    comparison posted again replaces itself (the latest verdict on a pair counts)."""
    import httpx

    for attempt in range(RESENDS + 1):
        try:
            return http.request(method, path, **kw)
        except (httpx.RemoteProtocolError, httpx.ConnectError):
            if attempt == RESENDS:
                raise
            time.sleep(RESEND_PAUSE * (attempt + 1))


class VersionGone(UserError):
    """A pinned version (``teto@v6``) that is no longer served: the experiment it was in was
    decided (retired, or promoted and swapped out) while its side-by-side round was asked."""


class Api:
    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=600)
        self.admin = GatewayClient(url)

    def ask(self, model: str, prompt: str, max_tokens: int, temperature: float, seed: int | None = None,
            headers: dict | None = None) -> dict:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": temperature, **({"seed": seed} if seed is not None else {})}
        r = self._post("/v1/chat/completions", body, headers or {})
        if r.status_code == 404 and "@v" in model and error_code(r) == "model_not_found":
            raise VersionGone(f"{model} is no longer served: {r.text[:200]}")
        if r.status_code != 200:
            raise UserError(f"the gateway refused a chat ({r.status_code}): {r.text[:200]}")
        return r.json()

    def compare(self, turn_a: str, turn_b: str, choice: str, left: str, headers: dict) -> None:
        body = {"turn_a": turn_a, "turn_b": turn_b, "choice": choice, "left": left}
        r = self._post("/v1/comparisons", body, headers)
        if r.status_code != 200:
            raise UserError(f"the gateway refused a comparison ({r.status_code}): {r.text[:200]}")

    def _post(self, path: str, body: dict, headers: dict):
        """POST as a patient client would: a 429 (over the voter's vote quota, or the gateway
        full) or a 503 with Retry-After (an engine restarting, a connection lost) is tried
        again after the time the gateway asked for, up to MAX_QUOTA_WAITS times."""
        r = resend(self.http, "post", path, json=body, headers=headers)
        for _ in range(MAX_QUOTA_WAITS):
            if r.status_code != 429 and not (r.status_code == 503 and "Retry-After" in r.headers):
                break
            time.sleep(float(r.headers.get("Retry-After", "1")))
            r = resend(self.http, "post", path, json=body, headers=headers)
        return r

    def _admin(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw):
        """An admin request (the admin key's headers); a status not in ``ok`` is a UserError."""
        import httpx

        try:
            r = resend(self.admin.http, method, path, **kw)
        except httpx.HTTPError as exc:
            raise UserError(f"the gateway at {self.admin.url} did not answer {path} ({type(exc).__name__}): "
                            "start it first with `persona up` (after `persona setup`)") from None
        if r.status_code not in ok:
            hint = " (check PERSONA_ADMIN_KEY or PERSONA_ADMIN_KEY_FILE)" if r.status_code in (401, 403) else ""
            raise UserError(f"the gateway refused {method.upper()} {path} ({r.status_code}): {error_message(r)}{hint}")
        return r

    def retrain(self, persona: str, timeout: float, promotion: str = "recipe") -> dict:
        """Ask for a run now and return it once finished. ``promotion`` "gate" or "ab" overrides
        the recipe's; "recipe" sends none. When a run is already going (409: the scheduler
        started one), the round waits for that run instead and starts none after it."""
        asked = runs.now()
        body = {"persona": persona, "force": True, **({"promotion": promotion} if promotion != "recipe" else {})}
        if self._admin("post", "/admin/retrain", ok=(200, 409), json=body).status_code == 200:
            return self.admin.wait_for_run(persona, asked, timeout)
        console.print(f"{persona}: a run is already going, so this round's run is the scheduler's: waiting for it"
                      + (f" (--promotion {promotion} does not apply to it)" if promotion != "recipe" else ""))
        run = self.wait_for_going_run(persona, timeout)
        console.print(f"{persona}: the round's run was the scheduler's: {run['id']}, {run['status']}")
        return run

    def newest_run(self, persona: str) -> dict | None:
        found = self._admin("get", "/admin/runs", params={"persona": persona, "limit": 1}).json()["runs"]
        return found[0] if found else None

    def wait_for_going_run(self, persona: str, timeout: float) -> dict:
        """The run already going, once finished. When it has not recorded itself yet (the
        scheduler is still exporting its snapshot), it is the next run recorded after the
        newest finished one."""
        newest = self.newest_run(persona)
        over = newest["id"] if newest and newest["status"] in runs.FINISHED else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(RUN_POLL_SECONDS)
            run = self.newest_run(persona)
            if run and run["id"] != over and run["status"] in runs.FINISHED:
                return run
        raise UserError(f"the run of {persona} already going did not finish within {timeout:.0f} s")

    def experiment(self, persona: str, challenger: int) -> dict | None:
        """The newest A/B experiment of ``persona`` whose challenger is that version."""
        found = self._admin("get", "/admin/experiments", params={"persona": persona}).json()["experiments"]
        return next((e for e in found if version_number(e["challenger"]) == challenger), None)

    def running_experiment(self, persona: str) -> dict | None:
        found = self._admin("get", "/admin/experiments", params={"persona": persona}).json()["experiments"]
        return next((e for e in found if e["status"] == "running"), None)

    def stop_experiment(self, experiment_id) -> bool:
        """Stop a running experiment; False when the last votes decided it meanwhile (409)."""
        return self._admin("post", f"/admin/experiments/{experiment_id}/stop", ok=(200, 409),
                           json={}).status_code == 200

    def active_version(self, persona: str, headers: dict) -> int:
        """The persona's active version. While an A/B experiment runs, the API's answer may come
        from the challenger (a sticky share of clients gets it), so the experiment says."""
        running = self.running_experiment(persona)
        if running:
            return version_number(running["active"])
        reply = self.ask(persona, "hi", 1, 0.0, headers=headers)
        return int(reply["model"].split("@v")[1])


def _text(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


class PreferenceMeter:
    """For each rater, how often it prefers the served version's greedy answer to the original
    version's on the held-out prompts (its own taste, without --flip's noise; ties count
    half). Greedy answers of a version do not change, so the original's are asked once and a
    version already measured is not measured again; the original against itself is 50%.
    ``answers`` keeps each version's greedy answers (the --out file carries them, so the
    measure can be read, or scored again by another rater, afterwards)."""

    def __init__(self, api: Api, raters: list[Rater], persona: str, original: int, prompts: list[str],
                 max_tokens: int, workers: int = 8):
        self.api, self.raters, self.persona, self.original = api, raters, persona, original
        self.prompts, self.max_tokens, self.workers = prompts, max_tokens, workers
        self.answers: dict[int, list[str]] = {}  # greedy answers of each version measured
        self.rates: dict[int, list[float]] = {original: [0.5] * len(raters)}

    def _answers(self, model: str) -> list[str]:
        headers = self.raters[0].headers
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda p: _text(self.api.ask(model, p, self.max_tokens, 0.0, headers=headers)),
                                 self.prompts))

    def measure(self, served: int) -> list[float]:
        for version in dict.fromkeys((self.original, served)):
            if version not in self.answers:
                self.answers[version] = self._answers(f"{self.persona}@v{version}")
        if served not in self.rates:
            self.rates[served] = [self._rate(rater, self.answers[served]) for rater in self.raters]
        return self.rates[served]

    def _rate(self, rater: Rater, new: list[str]) -> float:
        score = 0.0
        for i, (prompt, mine, theirs) in enumerate(zip(self.prompts, new, self.answers[self.original])):
            a_is_new = i % 2 == 0  # alternate positions: the rater sees no fixed order
            verdict = rater.judge(prompt, mine, theirs) if a_is_new else rater.judge(prompt, theirs, mine)
            score += 0.5 if verdict == "tie" else float((verdict == "a") == a_is_new)
        return score / max(len(self.prompts), 1)


def rate_round(api: Api, raters: list[Rater], args, rng: random.Random, round_no: int) -> tuple[dict, dict | None]:
    """One round of comparisons, as the side-by-side view asks them: two answers of the active
    version, or, while an A/B experiment runs, the active version against the challenger (so
    the round's votes decide it, as users' side-by-side votes do). Asked in batches, the
    experiment looked at between them; returns the verdicts posted, counted, and the last
    experiment the round voted in (None if none)."""
    counts, seen, left = {"a": 0, "b": 0, "tie": 0}, None, args.pairs_per_round
    while left > 0:
        running = api.running_experiment(args.persona)
        seen = running or (seen and api.experiment(args.persona, version_number(seen["challenger"])))
        one, two = ((f"{args.persona}@v{version_number(running['active'])}",
                     f"{args.persona}@v{version_number(running['challenger'])}") if running
                    else (args.persona, args.persona))
        batch = min(left, AB_BATCH if running else left)
        jobs = [(rng.choice(args.prompts_list), (one, rng.randrange(1 << 30)), (two, rng.randrange(1 << 30)),
                 rng.choice("ab")) for _ in range(batch)]
        label = f"round {round_no}: asking and rating" + (f" ({two} against {one})" if running else "")
        for key, value in judge_jobs(api, raters, args, rng, jobs, label).items():
            counts[key] += value
        left -= batch
    if seen and seen["status"] == "running":
        seen = api.experiment(args.persona, version_number(seen["challenger"]))
    return counts, seen


def judge_jobs(api: Api, raters: list[Rater], args, rng: random.Random, jobs: list, label: str) -> dict[str, int]:
    """Each job (prompt, (model, seed) of answer one, (model, seed) of answer two, which is left)
    asked and judged by every rater under its own key, and the comparison posted (turn_a is
    answer one); returns the verdicts posted (as shown, left = a), counted. A job whose pinned
    version stopped being served meanwhile (its experiment decided) is dropped, not an error."""
    work = [(job, rater, rater.keys[j % len(rater.keys)], rng.random() < args.flip)
            for j, job in enumerate(jobs) for rater in raters]  # a rater's pairs spread evenly over its keys

    def rate_one(item):
        (prompt, (model_one, seed_one), (model_two, seed_two), left), rater, headers, flipped = item
        # both answers at once: the engine batches them with the other jobs' (twice the rows per step)
        second = seconds.submit(api.ask, model_two, prompt, args.max_tokens, args.temperature, seed_two, headers)
        try:
            one = api.ask(model_one, prompt, args.max_tokens, args.temperature, seed_one, headers)
            two = second.result()
        except VersionGone:  # the experiment was decided meanwhile: this pair no longer counts
            return None
        shown = (one, two) if left == "a" else (two, one)
        verdict = rater.judge(prompt, *(_text(s) for s in shown))
        verdict = flip(verdict) if flipped else verdict
        choice = verdict if verdict == "tie" or left == "a" else flip(verdict)
        api.compare(one["id"], two["id"], choice, left, headers)
        return verdict

    counts = {"a": 0, "b": 0, "tie": 0}
    with Progress(console=console, transient=True) as progress, ThreadPoolExecutor(args.workers) as pool, \
            ThreadPoolExecutor(args.workers) as seconds:
        task = progress.add_task(label, total=len(work))
        for verdict in pool.map(rate_one, work):
            if verdict is not None:
                counts[verdict] += 1
            progress.advance(task)
    return counts


def ab_batch(api: Api, raters: list[Rater], args, rng: random.Random, active: int, challenger: int,
             comparisons: int) -> dict[str, int]:
    """About ``comparisons`` side-by-side votes between the two pinned versions: each prompt
    asked of both with one seed, judged by every rater; returns the verdicts posted, counted."""
    jobs = []
    for _ in range(max(1, comparisons // len(raters))):
        prompt, seed, left = rng.choice(args.prompts_list), rng.randrange(1 << 30), rng.choice("ab")
        jobs.append((prompt, (f"{args.persona}@v{active}", seed), (f"{args.persona}@v{challenger}", seed), left))
    return judge_jobs(api, raters, args, rng, jobs, f"A/B: v{challenger} against v{active}")


def play_ab(api: Api, raters: list[Rater], args, rng: random.Random, experiment: dict | None) -> dict | None:
    """Vote in a running A/B experiment, unattended, until the gateway decides it; stop it
    after ``--ab-max-votes`` decisive comparisons (a tie tells the test nothing, so a taste
    that ties often is not cut short by its ties), or four times as many in all. Returns
    the experiment as it ends, with ``played`` (the comparisons posted)."""
    if experiment is None:
        console.print("[yellow]the run left a challenger, but the gateway lists no experiment of it: no A/B votes[/]")
        return None
    active, challenger = version_number(experiment["active"]), version_number(experiment["challenger"])
    played = decisive = 0
    hopeless = None
    while experiment["status"] == "running" and decisive < args.ab_max_votes and played < 4 * args.ab_max_votes:
        counts = ab_batch(api, raters, args, rng, active, challenger, min(AB_BATCH, args.ab_max_votes - decisive))
        played, decisive = played + sum(counts.values()), decisive + counts["a"] + counts["b"]
        experiment = api.experiment(args.persona, challenger) or experiment
        if not sum(counts.values()):  # a version of the pair is no longer served: nothing more can be played
            break
        hopeless = futile(experiment, decisive_left(args.ab_max_votes, played, decisive), args.ab_futility)
        if hopeless:
            break
    stopped = experiment["status"] == "running" and api.stop_experiment(experiment["id"])
    if experiment["status"] == "running":
        experiment = api.experiment(args.persona, challenger) or {**experiment, "status": "stopped"}
    if stopped:
        why = hopeless or f"still undecided at --ab-max-votes {args.ab_max_votes}"
        console.print(f"[yellow]A/B of v{challenger} against v{active}: {why}, after {played} comparisons, "
                      f"{decisive} decisive: stopped it[/]")
    else:
        console.print(f"A/B of v{challenger} against v{active}: {experiment['status']} after {played} comparisons")
    return {**experiment, "played": played}


def decisive_left(max_votes: int, played: int, decisive: int) -> int:
    """Decisive comparisons still to come: up to ``max_votes`` of them, within the
    ``4 * max_votes`` comparisons in all, at the share of decisive ones seen so far (a
    taste that ties on most pairs has few left; the share starts from 1/2 a priori)."""
    share = (decisive + 1) / (played + 2)
    return max(0, min(max_votes - decisive, int((4 * max_votes - played) * share)))


def futile(experiment: dict, left: int, cut: float) -> str | None:
    """Why playing on is pointless, or None: with ``left`` decisive comparisons still to
    play, the experiment's chance of promoting its challenger (``promotion_chance``, on
    its figures and rules) is below ``cut``. It would almost surely end undecided."""
    figures = experiment.get("figures") or {}
    if not cut or experiment["status"] != "running" or left <= 0 or figures.get("votes") is None:
        return None
    votes, wins = int(figures["votes"]), int(round(figures["wins"]))
    rules = ABRules(alpha=float(experiment.get("alpha", ABRules.alpha)),
                    min_votes=int(experiment.get("min_votes", ABRules.min_votes)))
    chance = promotion_chance(wins, votes, votes + left, rules)
    if chance >= cut:
        return None
    return (f"{wins} wins of {votes} decisive, {chance:.1%} chance of a promotion within the "
            f"{left} still to play (--ab-futility {cut:g})")


def ab_cell(experiment: dict | None) -> str:
    """An experiment's outcome in a table cell: "promoted 31/45 (0.52-0.83)", or "-"."""
    if not experiment:
        return "-"
    figures = experiment.get("figures") or {}
    cell = experiment["status"]
    if figures.get("votes") is not None and figures.get("wins") is not None:
        cell += f" {figures['wins']:g}/{figures['votes']}"
    if figures.get("low") is not None and figures.get("high") is not None:
        cell += f" ({figures['low']:.2f}-{figures['high']:.2f})"
    return cell


def rm_accuracy(run: dict) -> float | None:
    """The reward model's held-out accuracy, when the run trained one and its record says."""
    metrics = run.get("metrics") or {}
    if isinstance(metrics, str):  # a store row may carry its metrics as JSON text
        metrics = json.loads(metrics)
    return (metrics.get("reward_model") or {}).get("heldout_accuracy")


def preferred(raters: list[Rater], rates: list[float]) -> list[dict]:
    return [{"rater": rater.spec, "rate": rate} for rater, rate in zip(raters, rates)]


def play_round(api: Api, raters: list[Rater], args, rng: random.Random, round_no: int,
               meter: PreferenceMeter) -> dict:
    """One round: comparisons, the run (and its A/B experiment, if it started one), and the
    measure on held-out prompts; returns the round's row."""
    clock = Phases()
    with clock("votes"):
        counts, experiment = rate_round(api, raters, args, rng, round_no)
    if experiment and experiment["status"] == "running":  # the round did not decide it: play it to its end
        with clock("ab"):
            experiment = play_ab(api, raters, args, rng, experiment)
    experiments = [experiment] if experiment else []
    with clock("run"):
        run = api.retrain(args.persona, args.timeout, args.promotion)
    if run["status"] == "challenger" and round_no == args.rounds:  # no next round to decide it
        with clock("ab"):
            last = play_ab(api, raters, args, rng,
                           api.experiment(args.persona, version_number(run["adapter_version"])))
        experiments += [last] if last else []
    with clock("measure"):
        served = api.active_version(args.persona, raters[0].headers)
        rates = meter.measure(served)
    keep = ("id", "status", "active", "challenger", "played", "figures")
    decided = [{k: e.get(k) for k in keep} for e in experiments]
    return {"round": round_no, "comparisons": sum(counts.values()), "verdicts": counts, "run": run["id"],
            "status": run["status"], "served": served,
            "reward_accuracy": run.get("reward_accuracy"), "rm_accuracy": rm_accuracy(run),
            "ab": decided[-1] if decided else None, "experiments": decided,
            "preferred": preferred(raters, rates), "heldout_answers": meter.answers[served],
            "seconds": clock.seconds}


def ab_cells(row: dict) -> str:
    """The round's experiments in one cell, each with its challenger when there are two
    (the one the round's votes decided, and the last round's own, played to its end)."""
    experiments = row.get("experiments") or ([row["ab"]] if row.get("ab") else [])
    if len(experiments) < 2:
        return ab_cell(experiments[0] if experiments else None)
    return "; ".join(f"v{version_number(e['challenger'])} {ab_cell(e)}" for e in experiments)


COLUMNS = ("round", "comparisons", "a / b / tie", "run", "status", "A/B", "served", "reward acc.", "RM acc.")


def row_cells(row: dict) -> list[str]:
    """A round's row as the table's cells (COLUMNS, then the preference rates)."""
    def percent(value):
        return "-" if value is None else f"{value:.0%}"

    verdicts = row.get("verdicts")
    return [str(row["round"]), "-" if row.get("comparisons") is None else str(row["comparisons"]),
            f"{verdicts['a']} / {verdicts['b']} / {verdicts['tie']}" if verdicts else "-", row.get("run") or "-",
            row.get("status") or "-", ab_cells(row), f"v{row['served']}", percent(row.get("reward_accuracy")),
            percent(row.get("rm_accuracy")), _rates([p["rate"] for p in row["preferred"]])]


def _rates(rates: list[float]) -> str:
    return " / ".join(f"{r:.0%}" for r in rates)


def load_prompts(args) -> tuple[list[str], list[str]]:
    """The prompts to ask (--prompts, else the persona's training prompts) and to measure on."""
    prompts = (json.loads(Path(args.prompts).read_text()) if args.prompts and args.prompts.endswith(".json")
               else Path(args.prompts).read_text().splitlines() if args.prompts
               else persona_prompts(args.persona, "train"))
    heldout = persona_prompts(args.persona, "heldout")[: args.heldout]
    if not prompts or not heldout:
        raise UserError(f"{args.persona} has no prompts to ask (train) or to measure on (held-out)")
    return prompts, heldout


def main(args) -> None:
    started = time.monotonic()  # the whole command: the original's measure included
    raters = load_raters(args.rater)
    if not 0 <= args.flip <= 1:
        raise UserError(f"--flip {args.flip}: a probability, between 0 and 1")
    if args.ab_max_votes < 1:
        raise UserError(f"--ab-max-votes {args.ab_max_votes}: one comparison at least")
    if not 0 <= args.ab_futility < 1:
        raise UserError(f"--ab-futility {args.ab_futility}: a chance from 0 up to (not including) 1")
    api = Api(args.gateway)
    args.prompts_list, heldout = load_prompts(args)
    rng = random.Random(args.seed)
    original = api.active_version(args.persona, raters[0].headers)
    names = ", ".join(r.spec for r in raters) + (f", verdicts flipped with p={args.flip:g}" if args.flip else "")
    title = f"{args.persona}: {'raters' if len(raters) > 1 else 'rater'} {names}"
    last = "preferred over original" + (" (each rater)" if len(raters) > 1 else "")
    meter = PreferenceMeter(api, raters, args.persona, original, heldout, args.max_tokens, args.workers)
    rows = [{"round": 0, "served": original, "preferred": preferred(raters, meter.measure(original)),
             "heldout_prompts": heldout, "heldout_answers": meter.answers[original]}]
    for round_no in range(1, args.rounds + 1):
        rows.append(play_round(api, raters, args, rng, round_no, meter))
        table = Table(*COLUMNS, last, title=title)
        for row in rows:
            table.add_row(*row_cells(row))
        console.print(table)
        console.print(f"round {round_no}: " + ", ".join(f"{part} {seconds:.0f} s"
                                                         for part, seconds in rows[-1]["seconds"].items()))
        if args.out:  # after every round, so a long simulation that stops keeps what it measured
            Path(args.out).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    console.print(f"{args.rounds} rounds in {(time.monotonic() - started) / 60:.1f} min"
                  + (f"; the table is in {args.out} (JSON, one object a round)" if args.out else ""))


def add_arguments(p) -> None:
    p.add_argument("--rater", required=True, action="append",
                   help="MODULE:FUNCTION, (prompt, answer_a, answer_b) -> a|b|tie; repeat it for several raters. "
                        "Each votes as its own voter, with its own API key: the keys of PERSONA_API_KEY "
                        "(comma-separated, one per rater at least) are dealt to the raters in turn, and a rater "
                        "with several spreads its pairs evenly over them. Every rater judges every pair. "
                        "train.raters ships shorter, longer, asks_back, direct, concrete, commits and mixed.")
    p.add_argument("--flip", type=float, default=0.0,
                   help="noise: each verdict of every rater is turned round with this probability (default 0)")
    p.add_argument("--persona", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs-per-round", type=int, default=64, help="pairs asked per round (each judged by every rater)")
    p.add_argument("--prompts", help="prompts to ask (a .txt file, one a line, or a .json list); "
                                     "default: the persona's training prompts")
    p.add_argument("--heldout", type=int, default=32, help="held-out prompts to measure on")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=SIDE_BY_SIDE_TEMPERATURE,
                   help=f"sampling temperature of the rated answers (default {SIDE_BY_SIDE_TEMPERATURE:g}, the "
                        "side-by-side view's); the measure on held-out prompts is greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=16,
                   help="pairs asked at once, both answers of each together (the engine batches them: 32 answers "
                        "in flight gave 1.25x the tokens per second of 16)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a retrain may take")
    p.add_argument("--promotion", choices=("recipe", "gate", "ab"), default="recipe",
                   help="how the rounds' runs promote a candidate that passes the gate: as the recipe says "
                        "(default), at once (gate), or as the challenger of an A/B experiment (ab), whose "
                        "side-by-side votes the raters then play until the gateway decides it")
    p.add_argument("--ab-max-votes", type=int, default=128,
                   help="decisive A/B comparisons (not ties) played at most, and four times as many in all; "
                        "an experiment still undecided then is stopped")
    p.add_argument("--ab-futility", type=float, default=0.03,
                   help="stop an A/B early once its chance of promoting the challenger within --ab-max-votes "
                        "is below this (default 0.03; 0 plays every one): it would end undecided anyway")
    p.add_argument("--out", help="also write the table to this file, as JSON (a list of rows)")
    p.add_argument("--gateway", default="http://127.0.0.1:7860")
    p.set_defaults(func=main)
