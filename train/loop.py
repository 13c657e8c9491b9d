"""One turn of the continual loop for a persona: data, the training step, gate, promotion.

    record = retrain("teto", gateway="http://127.0.0.1:7860")                  # snapshot asked of the gateway
    record = retrain("teto", gateway=url, snapshot="PERSONA_HOME/snapshots/…")   # the scheduler's runs

The orchestration of a run, all in this module:

1. Data: a snapshot of the feedback store (the one the scheduler took and
   passed in, else one the running gateway exports, else the store file itself
   when no gateway holds it); ``feedback.pairs`` builds the persona's DPO pairs
   and KTO examples with the recipe's pair rules, and the chosen kind is
   written as Parquet into the run's folder.
2. The step: ``train.dpo.run`` (what ``persona train dpo`` runs) continues the
   active adapter on that file and registers a candidate, not activated.
3. The gate (``train.gate``). A rejected candidate stays on disk, not served,
   with its reasons in the run record.
4. Promotion: the registry's pointer moves to the candidate and the gateway
   hot-swaps it into every engine; if an engine refuses it, the pointer goes
   back and the run says why.

Every run is recorded in the store (through the gateway's admin API while it
runs): start, end, status, counts, metrics and versions. Runs a dead process
left marked as going are closed first (``feedback.runs.close_interrupted``).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from rich.console import Console

from feedback import export, keys, pairs, runs, settings
from feedback.errors import UserError
from train import registry

console = Console(stderr=True)


def bearer(name: str) -> dict:
    """The Authorization header for a kind of key (``PERSONA_API_KEY`` or ``PERSONA_ADMIN_KEY``):
    the variable's first key, else its key file's (``feedback.keys``), or none."""
    return keys.bearer_header(name.removeprefix("PERSONA_").removesuffix("_KEY"))


def error_message(response) -> str:
    """The message of an error response in OpenAI's shape (or the start of its text)."""
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def error_code(response) -> str | None:
    """The ``code`` of an error response in OpenAI's shape, or None."""
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


class GatewayClient:
    """The gateway's admin routes, for every command that talks to a running gateway."""

    def __init__(self, url: str):
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=600, headers=bearer("PERSONA_ADMIN_KEY"))

    @classmethod
    def reachable(cls, url: str | None) -> "GatewayClient | None":
        import httpx

        if not url:
            return None
        try:
            httpx.get(url.rstrip("/") + "/health", timeout=5)
        except httpx.HTTPError:
            return None
        return cls(url)

    def _post(self, path: str, body: dict | None = None) -> dict:
        import httpx

        try:
            r = self.http.post(path, json=body or {})
        except httpx.HTTPError as exc:
            raise UserError(f"the gateway at {self.url} did not answer {path} ({type(exc).__name__})") from None
        if r.status_code != 200:
            hint = " (check PERSONA_ADMIN_KEY or PERSONA_ADMIN_KEY_FILE)" if r.status_code in (401, 403) else ""
            raise UserError(f"the gateway at {self.url} refused {path} ({r.status_code}): {error_message(r)}{hint}")
        return r.json()

    def snapshot(self) -> str:
        return self._post("/admin/snapshot")["path"]

    def record_run(self, run: dict) -> None:
        self._post("/admin/runs", json.loads(json.dumps(run, default=str)))

    def reload(self) -> dict:
        return self._post("/admin/reload")["active"]

    def retrain(self, persona: str, force: bool, promotion: str | None = None) -> dict:
        """Ask the gateway's scheduler to start a run now; returns when it started (UTC text,
        comparable with the runs' ``started_at``) and its log. ``promotion``: "gate" or "ab"
        instead of the recipe's."""
        asked = runs.now()
        body = {"persona": persona, "force": force, **({"promotion": promotion} if promotion else {})}
        return {**self._post("/admin/retrain", body), "asked": asked}

    def start_experiment(self, persona: str, version: int, run_id: str, rules: dict) -> dict:
        """Start the A/B experiment of a gate-passing candidate against the active version."""
        return self._post("/admin/experiments", {"persona": persona, "challenger": version, "run_id": run_id,
                                                 **rules})

    def wait_for_run(self, persona: str, since: str, timeout: float) -> dict:
        """The persona's newest run started at or after ``since``, once it has finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(2)
            last = self.http.get("/admin/runs", params={"persona": persona, "limit": 1}).json()["runs"]
            # JSON gives ISO time ("2026-01-02T10:00:00"); ``since`` is runs.now()'s "2026-01-02 10:00:00".
            if last and str(last[0]["started_at"]).replace("T", " ") >= since and last[0]["status"] in runs.FINISHED:
                return last[0]
        raise UserError(f"no finished run of {persona} after {timeout:.0f} s")


def kind_from_counts(method: str, counts: dict, min_pairs: int) -> str:
    """The kind of a run: DPO unless the recipe says KTO, or (auto) unpaired thumbs outnumber
    pairs 2:1 and there are too few pairs."""
    if method in ("dpo", "kto"):
        return method
    return "kto" if counts["kto"] >= 2 * max(counts["dpo"], 1) and counts["dpo"] < min_pairs else "dpo"


def retrain(persona: str, gateway: str | None = None, force: bool = False, recipe_name: str = "dpo",
            snapshot: str | None = None, promotion: str | None = None) -> dict:
    """One run for ``persona``; returns its record. ``snapshot``: a snapshot folder to read
    instead of asking the gateway for one; ``force``: train below the recipe's min_pairs and
    min_voters; ``promotion``: "gate" (promote once the gate passes) or "ab" (an A/B
    experiment decides) instead of the recipe's."""
    from train.personas import load_persona
    from train.recipes import DPORecipe, load_recipe, override

    info = load_persona(persona)
    recipe = load_recipe(recipe_name, DPORecipe)
    if promotion is not None:
        recipe = override(recipe, promotion=promotion)
    active = registry.active(persona)
    if active is None:
        raise UserError(f"{persona} has no active adapter yet (run: persona train sft --persona {persona})")
    client = GatewayClient.reachable(gateway)
    db = open_feedback(client, snapshot)
    run_dir = new_run_dir(persona)
    run = {"id": run_dir.name, "persona": persona, "status": "running", "parent_version": active.version,
           "started_at": runs.now()}
    try:
        runs.close_interrupted(db, persona, lambda row: _record(row, client, db))
        data, kind, examples, voters = export_preferences(db, persona, recipe, run_dir, active.version)
        run.update(kind=kind, train_examples=examples, metrics={"voter_rules": voters})
        if voters["voters"] < recipe.min_voters and not force:
            return _finish(run, client, db, "skipped", f"the {kind} data comes from {voters['voters']} distinct "
                                                       f"voter(s); the recipe needs {recipe.min_voters} (min_voters)")
        if examples < recipe.min_pairs and not force:  # the step's own rule (train.dpo.load_data)
            return _finish(run, client, db, "skipped", f"{examples} training {kind} examples; the recipe "
                                                       f"needs {recipe.min_pairs} (min_pairs)")
        _record(run, client, db)
        return _train_gate_promote(run, client, db, info, data, recipe, force)
    finally:
        db.close()


def open_feedback(client: GatewayClient | None, snapshot: str | None):
    """The feedback data of a run: the given snapshot, else a fresh one from the gateway,
    else the store file (no gateway runs, so no process holds it)."""
    from feedback.snapshot import Snapshot
    from feedback.store import Store

    if snapshot and client is None:  # a snapshot cannot take the run's records
        raise UserError("a run on a snapshot records itself through the gateway, and none answers")
    if snapshot or client:
        return Snapshot.open(snapshot or client.snapshot())
    return Store.open()


def export_preferences(db, persona: str, recipe, run_dir: Path, active_version: int) -> tuple[Path, str, int, dict]:
    """Build the persona's pairs with the recipe's rules, apply the run-level voter rules
    (``feedback.voters.apply_run_rules``: the share cap, the held-out split by voter) and
    bound the replay of pairs older than ``active_version`` (``train.replay``), and
    write the run's kind as Parquet (the step's input); returns (file, kind, training
    examples in it, the voter figures for the run's metrics)."""
    from feedback import voters
    from train.replay import bound_replay

    rules = recipe.pair_rules()
    counts = pairs.build(db, persona, rules, kinds=("dpo", "kto"))
    kind = kind_from_counts(recipe.method, counts, recipe.min_pairs)
    table = f"pref_{kind}"
    rows, figures = voters.apply_run_rules(export.read_rows(db, table), recipe.share_cap, recipe.heldout_percent,
                                           recipe.min_voters)
    rows, figures["replay"] = bound_replay(rows, active_version, recipe.replay_pairs, recipe.seed,
                                            recipe.max_new_pairs, recipe.max_heldout_pairs)
    export.write_back(db, table, rows)
    figures["outliers"] = pairs.built_outliers(db, persona)
    data = run_dir / f"{kind}.parquet"
    export.write_table(db, table, data)
    train = export.count(db, table, "train")
    console.print(f"{persona}: {counts['dpo']} DPO pairs, {counts['kto']} KTO examples -> {kind} run {run_dir.name} "
                  f"({train} {kind} examples to train on; {figures['voters']} voters, held out by "
                  f"{figures['split']}, largest voter share {figures['largest_share_after']:.0%}; "
                  f"{figures['replay']['new_kept']} of {figures['replay']['new']} new pairs, "
                  f"{figures['replay']['replayed']} of "
                  f"{figures['replay']['earlier']} earlier ones replayed; {figures['replay']['heldout_kept']} of "
                  f"{figures['replay']['heldout']} held-out pairs judged)")
    return data, kind, train, figures


def _train_gate_promote(run: dict, client, db, persona, data: Path, recipe, force: bool) -> dict:
    from train import base_model, dpo, gate

    try:
        version, metrics = dpo.run(persona, data, recipe, base_model.resolve(), force=force)
    except UserError as exc:
        return _finish(run, client, db, "failed", str(exc))
    run.update(adapter_version=version.version, train_examples=metrics["train_examples"],
               heldout_examples=metrics["heldout_examples"], reward_accuracy=metrics.get("reward_accuracy"),
               reward_margin=metrics.get("reward_margin"),
               metrics={**run.get("metrics", {}), **{k: v for k, v in metrics.items() if k != "sanity_answers"}})
    _record({**run, "status": "gating"}, client, db)
    ab = client is not None and promotion_mode(recipe, db, persona.name) == "ab"  # A/B needs a gateway's users
    reasons = gate.check(metrics, recipe, challenger=ab)
    if reasons:  # kept on disk, but never served, not even by pin
        registry.mark_rejected(persona.name, version.version, "; ".join(reasons))
        return _finish(run, client, db, "rejected", "; ".join(reasons))
    if ab:
        return _challenge(run, client, db, persona.name, version.version, recipe)
    return _promote(run, client, db, persona.name, version.version, run["parent_version"])


def promotion_mode(recipe, db, persona: str) -> str:
    """"gate" or "ab": the recipe's, and with ``auto`` ab where the persona has side-by-side
    votes (someone to decide an experiment), else gate."""
    if recipe.promotion != "auto":
        return recipe.promotion
    return "ab" if pairs.comparison_count(db, persona) > 0 else "gate"


def _challenge(run: dict, client, db, persona: str, version: int, recipe) -> dict:
    """Start the A/B experiment of a gate-passing candidate: the users' verdicts decide."""
    rules = {"share": recipe.ab_share, "min_votes": recipe.ab_min_votes, "alpha": recipe.ab_alpha,
             "max_hours": recipe.ab_max_hours}
    try:
        experiment = client.start_experiment(persona, version, run["id"], rules)
    except UserError as exc:
        return _finish(run, client, db, "failed", f"v{version} passed the gate but its A/B experiment did not start: "
                                                  f"{exc}")
    return _finish(run, client, db, "challenger",
                   f"v{version} passed the gate and challenges v{run['parent_version']} in experiment "
                   f"{experiment.get('id')} (side-by-side verdicts decide: {recipe.ab_min_votes} at least, "
                   f"{recipe.ab_share:.0%} of API clients served by it)")


def new_run_dir(persona: str) -> Path:
    """A new, empty folder for a run: the time to the second and a random suffix (two runs
    may start in the same second), created exclusively so no two runs share one."""
    parent = settings.runs_dir() / "retrain"
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        path = parent / f"{persona}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise UserError(f"could not create a run folder under {parent}")


def _promote(run: dict, client, db, persona: str, version: int, previous: int) -> dict:
    """Move the pointer to ``version`` and have the gateway hot-swap it. The registry marks
    the promotion as under way until the reload answered, so a process killed in between
    leaves it for ``registry.reconcile``. ``previous`` is the version the run started from;
    a refused promotion goes back to the one the pointer named just before (the same,
    unless someone promoted another meanwhile)."""
    try:
        with registry.promotion(persona, version, run["id"]) as promotion:
            if promotion.previous != previous:
                console.print(f"[yellow]{persona}: v{promotion.previous} became active while run {run['id']} "
                              f"trained from v{previous}[/]")
            if client:
                try:
                    client.reload()
                except UserError as exc:  # an engine refused the adapter: stay on the old version
                    promotion.undo(f"an engine refused it: {exc}")
                    client.reload()
                    return _finish(run, client, db, "failed",
                                   f"promotion failed, {persona} stays on v{promotion.previous}: {exc}")
    except registry.RegistryError as exc:  # e.g. another promotion of the persona is under way
        return _finish(run, client, db, "failed", f"not promoted: {exc}")
    return _finish(run, client, db, "promoted", f"{persona} now serves v{version}")


def _record(run: dict, client, db) -> None:
    if client:
        client.record_run(run)
    else:
        db.record_run(run)


def _finish(run: dict, client, db, status: str, message: str) -> dict:
    run.update(status=status, message=message, finished_at=runs.now())
    _record(run, client, db)
    colour = {"promoted": "green", "challenger": "green", "rejected": "yellow", "skipped": "yellow"}.get(status, "red")
    console.print(f"[{colour}]run {run['id']}: {status}[/] ({message})")
    return run
