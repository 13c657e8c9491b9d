"""The bodies of the ``persona`` subcommands (the parser is in ``serve/cli.py``).

This is the CLI root, so it may import ``serve``, ``train`` and ``feedback``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from feedback import settings
from feedback.errors import UserError

console = Console()
err = Console(stderr=True)


def version_number(text: str) -> int:
    """Accept ``3`` or ``v3``."""
    value = text[1:] if text.lower().startswith("v") else text
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a version like 3 or v3, got {text!r}")
    return int(value)


def provision(args) -> None:
    from train import base_model

    path = base_model.resolve(args.base_model)
    record = base_model.builtin_record(path)
    console.print(f"Base model ready: {path}" + (f" (built-in {record['name']}, languages: "
                                                  f"{', '.join(record['languages'])})" if record else ""))
    if record.get("licence"):
        console.print(f"Its terms of use: {', '.join(str(Path(path) / f) for f in record['licence'])}")


def setup(args) -> None:
    """Provision the base model, train every persona that has no active adapter, and score
    each SFT version that has no scores yet (``train.baseline``)."""
    from train import base_model, baseline, registry, sft
    from train.personas import list_persona_names, load_persona
    from train.recipes import load_recipe

    base = base_model.resolve()
    console.print(f"Base model ready: {base} (personas train in: {', '.join(base_model.languages(base))})")
    names = args.persona or list_persona_names()
    for name in names:
        persona = load_persona(name)
        current = registry.active(name)
        if current is not None:
            console.print(f"{name}: adapter {current.name} is active")
            continue
        console.print(f"{name}: no adapter yet, training one (SFT)")
        sft.run(persona, load_recipe(persona.recipe), base)
    # Once every persona has its SFT version (they judge each other's consistency), score
    # each SFT version once, so that the first preference run reuses the figures.
    for name in names:
        version, persona = registry.sft_version(name), load_persona(name)
        if version is not None and baseline.missing(persona, version):
            console.print(f"{name}: scoring {version.name} (persona consistency, held-out losses)")
            figures = baseline.measure(persona, version, base)
            if "consistency_candidate" in figures:
                console.print(f"{name}: {version.name} consistency {figures['consistency_candidate']:.0%}, "
                              f"held-out loss {figures.get('sft_nll_candidate', float('nan')):.3f}")


def train_sft(args) -> None:
    from train import sft

    sft.main(args)


def adapters_list(args) -> None:
    from train import registry
    from train.personas import list_persona_names

    listed = [(name, registry.versions(name)) for name in ([args.persona] if args.persona else list_persona_names())]
    languages = sorted({lang for _, versions in listed for v in versions
                        for lang in v.meta.get("metrics", {}).get("heldout_by_language", {})})
    table = Table("persona", "version", "status", "kind", "held-out NLL", "vs base",
                  *(f"held-out {lang}" for lang in languages), "consistency", "created", "path")
    for name, versions in listed:
        scores = consistency_of(versions)
        for v in versions:
            m = v.meta.get("metrics", {})
            nll = m.get("heldout_nll_adapter", m.get("sft_nll_candidate"))
            red = m.get("heldout_nll_reduction")
            status, reason = registry.status(name, v.version)
            score = scores.get(v.version)
            table.add_row(
                name, f"v{v.version}", f"{status}: {reason}" if reason else status,
                v.meta.get("kind", "?"), f"{nll:.3f}" if nll is not None else "-",
                f"-{red:.1%}" if red is not None else "-", *language_cells(m, languages),
                "-" if score is None else f"{score:.0%}",
                v.meta.get("created_at", "?"), str(v.path),
            )
    console.print(table)


def language_cells(metrics: dict, languages: list[str]) -> list[str]:
    """One cell per language: the SFT run's held-out NLL in it and its fall from the base model's."""
    by_language = metrics.get("heldout_by_language", {})
    cells = []
    for lang in languages:
        m = by_language.get(lang)
        red = (m or {}).get("heldout_nll_reduction")
        cells.append("-" if not m else f"{m['heldout_nll_adapter']:.3f}" + (f" (-{red:.1%})" if red is not None else ""))
    return cells


def consistency_of(versions) -> dict[int, float]:
    """Each version's persona-consistency score (``train.consistency``): a preference run
    measures its candidate's, and the SFT version's it was bounded by."""
    scores = {}
    for v in versions:
        m = v.meta.get("metrics", {})
        if m.get("consistency_sft") is not None and m.get("sft_version") is not None:
            scores.setdefault(m["sft_version"], m["consistency_sft"])
        if m.get("consistency_candidate") is not None:
            scores[v.version] = m["consistency_candidate"]
    return scores


def adapters_promote(args) -> None:
    from train import registry

    v = registry.set_active(args.persona, args.version, reason="manual promote")
    console.print(f"{args.persona}'s active version is now {v.name}")
    reload_gateway(args.gateway)


def adapters_rollback(args) -> None:
    from train import registry

    v = registry.rollback(args.persona)
    console.print(f"{args.persona} rolled back to {v.name}")
    reload_gateway(args.gateway)


def adapters_candidate(args) -> None:
    from train import registry

    v = registry.set_candidate(args.persona, None if args.clear else args.version)
    console.print(f"{args.persona}: " + (f"{v.name} is the candidate (side by side against the active version)"
                                         if v else "no candidate"))
    reload_gateway(args.gateway)


def reload_gateway(url: str) -> None:
    """Ask a running gateway to re-read the registry (hot swap); fine when none runs."""
    from train.loop import GatewayClient

    client = GatewayClient.reachable(url)
    if client is None:
        console.print(f"no gateway at {url}: the change applies when `persona up` starts")
        return
    active = client.reload()
    console.print(f"the gateway at {url} now serves: {', '.join(f'{k}={v}' for k, v in active.items())}")


def _gateway_or_store(args):
    """(client, None) for the running gateway's admin API, else (None, store) for the store file
    (no gateway holds it then)."""
    from pathlib import Path

    from feedback.store import Store, StoreError, default_path
    from train.loop import GatewayClient

    client = GatewayClient.reachable(args.gateway)
    if client is not None:
        return client, None
    path = Path(args.database) if args.database else default_path()
    if not path.exists():
        raise UserError(f"no gateway answers at {args.gateway} and there is no feedback store at {path} yet "
                        "(experiments start in a gateway: `persona up`)")
    try:
        return None, Store.open(path)
    except StoreError:
        raise UserError(f"{path} is held by another process and no gateway answers at {args.gateway}; "
                        "pass --gateway URL") from None


def _get(client, path: str, params: dict) -> dict:
    import httpx

    from train.loop import error_message

    try:
        r = client.http.get(path, params={k: v for k, v in params.items() if v is not None})
    except httpx.HTTPError as exc:
        raise UserError(f"the gateway at {client.url} did not answer {path} ({type(exc).__name__})") from None
    if r.status_code != 200:
        raise UserError(f"the gateway at {client.url} refused {path} ({r.status_code}): {error_message(r)}")
    return r.json()


EXPERIMENT_COLUMNS = ("id", "persona", "versions", "status", "votes", "wins", "win rate", "length-controlled",
                      "thumbs challenger", "thumbs active", "started", "decided", "reason")


def experiments_list(args) -> None:
    from feedback import experiments

    client, store = _gateway_or_store(args)
    if client is not None:
        rows = _get(client, "/admin/experiments", {"persona": args.persona, "limit": args.limit})["experiments"]
    else:
        try:
            rows = experiments.recent(store, args.persona, args.limit)
        finally:
            store.close()
    if not rows:
        console.print("no experiments yet" + (f" for {args.persona}" if args.persona else ""))
        return
    table = Table(title="A/B experiments (challenger vs active; win rate with its always-valid interval; the "
                        "decision rests on side-by-side verdicts)")
    for column in EXPERIMENT_COLUMNS:  # the id whole, however narrow the terminal: `experiments stop` takes it
        table.add_column(column, no_wrap=column == "id", min_width=16 if column == "id" else None)
    for row in rows:
        summary = experiments.summary(row)
        table.add_row(*(summary[c] for c in EXPERIMENT_COLUMNS))
    console.print(table)


def experiments_stop(args) -> None:
    from urllib.parse import quote

    client, store = _gateway_or_store(args)
    if client is not None:
        exp = client._post(f"/admin/experiments/{quote(args.id, safe='')}/stop")
    else:
        try:
            exp = _stop_in_store(store, args.id)
        finally:
            store.close()
    console.print(f"experiment {exp['id']} stopped: {exp['persona']} v{exp['challenger']} is retired, "
                  f"v{exp['active']} stays active")


def _stop_in_store(store, experiment_id: str) -> dict:
    """What the gateway's stop does, with no gateway running: retire the challenger in the
    registry, close the experiment and note it on its run."""
    from feedback import experiments, runs
    from train import registry

    exp = experiments.get(store, experiment_id)
    reason = "stopped by an operator"
    if exp["status"] == "running":
        try:
            registry.retire(exp["persona"], exp["challenger"], f"experiment {experiment_id} {reason}")
        except registry.RegistryError as exc:  # promoted by hand meanwhile: that decision stands
            err.print(f"[yellow]{exp['persona']} v{exp['challenger']} not retired: {exc}[/]")
    done = experiments.stop(store, experiment_id, reason)
    if done["run_id"]:
        runs.record_outcome(store, done["run_id"], "retired", f"A/B experiment {experiment_id} {reason}")
    return done


def chat(args) -> None:
    """Answer one message with the persona's adapter, in this process."""
    from serve.local_chat import generate_reply
    from train import base_model, registry
    from train.personas import load_persona

    from serve.protocol import CHAT_REPETITION_PENALTY, MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY

    if args.repetition_penalty is None:
        args.repetition_penalty = CHAT_REPETITION_PENALTY
    if not MIN_REPETITION_PENALTY <= args.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise UserError(f"--repetition-penalty {args.repetition_penalty}: from {MIN_REPETITION_PENALTY:g} to "
                        f"{MAX_REPETITION_PENALTY:g} (1 turns it off)")
    persona = load_persona(args.persona)
    adapter = registry.get(persona.name, args.version) if args.version else registry.active(persona.name)
    if adapter is None:
        raise UserError(f"{persona.name} has no adapter yet: run `persona train sft --persona {persona.name}`")
    base = adapter.meta.get("base_model") or base_model.resolve()
    started = time.time()
    reply = generate_reply(
        base, str(adapter.path), persona.system_prompt, args.message,
        max_new_tokens=args.max_tokens, temperature=args.temperature, repetition_penalty=args.repetition_penalty,
    )
    err.print(f"[dim]{adapter.name}, {time.time() - started:.1f} s[/]")
    console.print(f"[bold]{persona.display_name}:[/] {reply}")


def engine(args) -> None:
    """Serve the embedded engine with every persona's active adapter loaded as <persona>-v<N>."""
    import asyncio

    import uvicorn

    from serve.engine.embedded import EmbeddedEngine
    from serve.engine.routes import create_app
    from train import base_model, registry

    engine = EmbeddedEngine(base_model.resolve(), max_model_len=args.max_model_len, max_batch=args.max_batch,
                            dtype=args.dtype, max_lora_rank=args.max_lora_rank)

    async def load_active_adapters():
        for adapter in [] if args.no_adapters else registry.active_adapters():
            await engine.load_adapter(adapter.name, str(adapter.path))
            err.print(f"loaded {adapter.name} from {adapter.path}")

    key = settings.get("PERSONA_ENGINE_API_KEY") or None
    app = create_app(engine, on_start=load_active_adapters, api_key=key)
    asyncio.run(uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info")).serve())


def data_check(args) -> None:
    from pathlib import Path

    from train.data import load_file
    from train.personas import list_personas

    if args.files:
        targets = [(Path(f), args.language) for f in args.files]
    else:
        targets = [(p.resolve(f.path), f.language) for p in list_personas()
                   for f in p.data.train + p.data.heldout + p.data.safety]
    total = 0
    for path, language in targets:
        n = len(load_file(path, language))
        total += n
        console.print(f"ok  {n:5d} records  {path}")
    console.print(f"{total} records in {len(targets)} files are valid")


def show_settings(args) -> None:
    table = Table("variable", "value", "meaning")
    for name, value, doc in settings.describe():
        table.add_row(name, value, doc)
    console.print(table)
