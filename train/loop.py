"""One turn of the continual loop for a persona: data, retrain, gate, promote.

    record = retrain("teto", gateway="http://127.0.0.1:7860")

1. Preference data from a snapshot the running gateway exports (or from the
   store file when no gateway holds it), built by ``feedback.pairs``.
2. A DPO (or KTO) run from the active adapter (``train.dpo``).
3. The gate (``train.gate``). A rejected candidate stays on disk, not served,
   with its reasons in the run record.
4. Promotion: the registry's pointer moves to the candidate and the gateway
   hot-swaps it into every engine; if an engine refuses it, the pointer goes
   back and the run says why.

Every run is recorded in the store (through the gateway's admin API while it
runs): start, end, status, counts, metrics and versions.
"""

from __future__ import annotations

import json
import time

from rich.console import Console

from feedback import pairs, settings
from feedback.errors import UserError
from train import registry

console = Console(stderr=True)


FINISHED = ("promoted", "rejected", "skipped", "failed")  # a run in any other status is still going


def bearer(name: str) -> dict:
    """The Authorization header for the first key in a key variable, or none."""
    keys = settings.get(name)
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def error_message(response) -> str:
    """The message of an error response in OpenAI's shape (or the start of its text)."""
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


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
            hint = " (check PERSONA_ADMIN_KEY)" if r.status_code in (401, 403) else ""
            raise UserError(f"the gateway at {self.url} refused {path} ({r.status_code}): {error_message(r)}{hint}")
        return r.json()

    def snapshot(self) -> str:
        return self._post("/admin/snapshot")["path"]

    def record_run(self, run: dict) -> None:
        self._post("/admin/runs", json.loads(json.dumps(run, default=str)))

    def reload(self) -> dict:
        return self._post("/admin/reload")["active"]

    def retrain(self, persona: str, force: bool) -> dict:
        """Ask the gateway's scheduler to start a run now; returns when it started (UTC text,
        comparable with the runs' ``started_at``) and its log."""
        asked = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        return {**self._post("/admin/retrain", {"persona": persona, "force": force}), "asked": asked}

    def wait_for_run(self, persona: str, since: str, timeout: float) -> dict:
        """The persona's newest run started at or after ``since``, once it has finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(2)
            runs = self.http.get("/admin/runs", params={"persona": persona, "limit": 1}).json()["runs"]
            if runs and str(runs[0]["started_at"]) >= since and runs[0]["status"] in FINISHED:
                return runs[0]
        raise UserError(f"no finished run of {persona} after {timeout:.0f} s")


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def choose_kind(method: str, counts: dict, min_pairs: int) -> str:
    """DPO unless the recipe says KTO, or (auto) unpaired thumbs outnumber pairs 2:1."""
    if method in ("dpo", "kto"):
        return method
    return "kto" if counts["kto"] >= 2 * max(counts["dpo"], 1) and counts["dpo"] < min_pairs else "dpo"


def retrain(persona: str, gateway: str | None = None, force: bool = False, recipe_name: str = "dpo") -> dict:
    from feedback.snapshot import Snapshot
    from feedback.store import Store
    from train import base_model, dpo, gate
    from train.personas import load_persona
    from train.recipes import DPORecipe, load_recipe

    info = load_persona(persona)
    recipe = load_recipe(recipe_name, DPORecipe)
    active = registry.active(persona)
    if active is None:
        raise UserError(f"{persona} has no active adapter yet (run: persona train sft --persona {persona})")
    client = GatewayClient.reachable(gateway)
    db = Snapshot.open(client.snapshot()) if client else Store.open()
    run_dir = settings.runs_dir() / "retrain" / f"{persona}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    run = {"id": run_dir.name, "persona": persona, "status": "running", "parent_version": active.version,
           "started_at": _now()}
    try:
        close_interrupted(persona, client, db)
        counts = pairs.build(db, persona, pairs.PairRules(voter_cap=recipe.voter_cap,
                                                          heldout_percent=recipe.heldout_percent),
                             kinds=("dpo", "kto"))
        kind = choose_kind(recipe.method, counts, recipe.min_pairs)
        data = run_dir / f"{kind}.parquet"
        db.execute(f"COPY pref_{kind} TO '{str(data).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
        run.update(kind=kind, train_examples=counts[kind])
        console.print(f"{persona}: {counts['dpo']} DPO pairs, {counts['kto']} KTO examples -> {kind} run {run['id']}")
        if counts[kind] < recipe.min_pairs and not force:
            return _finish(run, client, db, "skipped", f"{counts[kind]} {kind} examples; the recipe needs "
                                                       f"{recipe.min_pairs} (min_pairs)")
        _record(run, client, db)
        try:
            version, metrics = dpo.run(info, data, recipe, base_model.resolve())
        except UserError as exc:
            return _finish(run, client, db, "failed", str(exc))
        run.update(adapter_version=version.version, train_examples=metrics["train_examples"],
                   heldout_examples=metrics["heldout_examples"], reward_accuracy=metrics.get("reward_accuracy"),
                   reward_margin=metrics.get("reward_margin"),
                   metrics={k: v for k, v in metrics.items() if k != "sanity_answers"})
        _record({**run, "status": "gating"}, client, db)
        reasons = gate.check(metrics, recipe)
        if reasons:
            return _finish(run, client, db, "rejected", "; ".join(reasons))
        return _promote(run, client, db, persona, version.version, active.version)
    finally:
        db.close()


def _promote(run: dict, client, db, persona: str, version: int, previous: int) -> dict:
    registry.set_active(persona, version, reason=f"retrain {run['id']}")
    if client:
        try:
            client.reload()
        except UserError as exc:  # an engine refused the adapter: stay on the old version
            registry.set_active(persona, previous, reason=f"engine refused v{version}")
            client.reload()
            return _finish(run, client, db, "failed", f"promotion failed, {persona} stays on v{previous}: {exc}")
    return _finish(run, client, db, "promoted", f"{persona} now serves v{version}")


INTERRUPTED = "interrupted: its process ended before the run finished; nothing was promoted"


def close_interrupted(persona: str, client, db, message: str = INTERRUPTED) -> None:
    """Runs of this persona still marked as going belong to a process that died (one run
    per persona at a time): record them as failed (through the gateway when ``client``)."""
    rows = db.query_dicts(f"SELECT * FROM training_runs WHERE persona = ? AND status NOT IN "
                          f"({', '.join('?' for _ in FINISHED)})", [persona, *FINISHED])
    for row in rows:
        metrics = row.get("metrics")
        row.update(status="failed", finished_at=_now(), message=message,
                   metrics=json.loads(metrics) if isinstance(metrics, str) and metrics else metrics)
        _record(row, client, db)


def _record(run: dict, client, db) -> None:
    if client:
        client.record_run(run)
    else:
        db.record_run(run)


def _finish(run: dict, client, db, status: str, message: str) -> dict:
    run.update(status=status, message=message, finished_at=_now())
    _record(run, client, db)
    colour = {"promoted": "green", "rejected": "yellow", "skipped": "yellow"}.get(status, "red")
    console.print(f"[{colour}]run {run['id']}: {status}[/] ({message})")
    return run
