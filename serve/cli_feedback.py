"""``persona feedback stats|export``: the feedback figures and preference data, in the terminal.

While the gateway runs it holds the store file, so these commands ask it for a
Parquet snapshot (``POST /admin/snapshot``) and read that; when no gateway runs
they open the file themselves.

    persona feedback stats [--json]
    persona feedback export --format dpo --persona teto --out teto-dpo.parquet   # or .jsonl
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from feedback.errors import UserError

out = Console()
err = Console(stderr=True)
FORMATS = ("dpo", "kto", "sft")


def add_arguments(sub) -> None:
    def common(p):
        p.add_argument("--database", help="the store file (default: PERSONA_HOME/feedback.duckdb)")
        p.add_argument("--gateway", default="http://127.0.0.1:7860",
                       help="the running gateway to ask for a snapshot when it holds the file")
        p.add_argument("--snapshot", help="read this snapshot folder instead")

    p = sub.add_parser("stats", help="votes, voters and their agreement, thumbs-up and win rates with 95%% "
                                     "intervals, biases, runs")
    common(p)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=stats)
    p = sub.add_parser("export", help="preference data in TRL's conversational formats (Parquet or JSONL)")
    common(p)
    p.add_argument("--format", required=True, choices=FORMATS, help="dpo pairs, kto examples or sft dialogues")
    p.add_argument("--persona", required=True)
    p.add_argument("--out", required=True, help="output file: .parquet or .jsonl")
    p.add_argument("--split", choices=["all", "train", "heldout"], default="all",
                   help="which part of the split by context (default: all, with a split column)")
    p.set_defaults(func=export)


def open_data(args):
    """The store's tables: a snapshot folder, the file itself, or a snapshot from the gateway."""
    from feedback.snapshot import Snapshot
    from feedback.store import Store, StoreError, default_path

    if args.snapshot:
        return Snapshot.open(args.snapshot)
    path = Path(args.database) if args.database else default_path()
    if not path.exists():
        raise UserError(f"no feedback store at {path} yet: it is created by `persona up`")
    try:
        return Store.open(path)
    except StoreError:
        pass  # held by the gateway: ask it for a snapshot
    from train.loop import GatewayClient

    client = GatewayClient.reachable(args.gateway)
    if client is None:
        raise UserError(f"{path} is held by another process and no gateway answers at {args.gateway}; "
                        "pass --gateway URL or --snapshot FOLDER")
    folder = client.snapshot()
    err.print(f"reading the snapshot the gateway wrote: {folder}")
    return Snapshot.open(folder)


def _pct(rate) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def stats(args) -> None:
    from feedback import stats as fstats

    db = open_data(args)
    try:
        figures = fstats.summary(db)
    finally:
        db.close()
    if args.json:
        print(json.dumps(figures, default=str, indent=2))
        return
    t = figures["totals"]
    out.print(f"{t['turns']} turns, {t['votes']} current thumbs votes, {t['comparisons']} side-by-side votes, "
              f"{t['voters']} voters")
    _print_voters(figures)
    _print_rates(figures)
    _print_training(figures)


def _number(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def _print_voters(figures: dict) -> None:
    table = Table("persona", "turns", "voters", "own system prompt: turns left out", "votes on them",
                  title="Voters per persona (turns with the caller's own system prompt do not train)")
    for r in figures["personas"]:
        table.add_row(r["persona"], str(r["turns"]), str(r["voters"]), str(r["own_prompt_turns"]),
                      str(r["own_prompt_votes"]))
    out.print(table)
    table = Table("persona", "votes", "Krippendorff's alpha", "Cohen's kappa", "contexts", "voters",
                  title="Agreement between voters (contexts judged by 2+ voters; 1 = agree, 0 = chance)")
    for r in figures["agreement"]:
        table.add_row(r["persona"], r["kind"].replace("_", " "), _number(r["alpha"]), _number(r["kappa"]),
                      str(r["contexts"]), str(r["voters"]))
    out.print(table)
    if figures["outliers"]:
        table = Table("persona", "voter", "why", title="Voters given no weight (against the others' consensus)")
        for r in figures["outliers"]:
            table.add_row(r["persona"], r["voter"], r["reason"])
        out.print(table)
    else:
        out.print("No voter goes against the others' consensus more than chance would.")


def _print_rates(figures: dict) -> None:
    table = Table("persona", "version", "up", "down", "thumbs-up rate", "95% interval",
                  title="Thumbs per persona and adapter version")
    for r in figures["thumbs"]:
        table.add_row(r["persona"], f"v{r['version']}", str(r["up"]), str(r["down"]), _pct(r["rate"]),
                      f"{r['low']:.0%} – {r['high']:.0%}")
    out.print(table)
    table = Table("persona", "version", "wins", "games", "win rate", "95% interval",
                  title="Side by side against other versions (tie = half a win)")
    for r in figures["win_rates"]:
        table.add_row(r["persona"], f"v{r['version']}", f"{r['wins']:g}", str(r["games"]), _pct(r["rate"]),
                      f"{r['low']:.0%} – {r['high']:.0%}")
    out.print(table)
    table = Table("bias", "times", "of", "rate", "95% interval", title="Biases (0.5 = none)")
    for r in figures["biases"]:
        table.add_row(r["bias"], str(r["wins"]), str(r["n"]), _pct(r["rate"]), f"{r['low']:.0%} – {r['high']:.0%}")
    out.print(table)


def _print_training(figures: dict) -> None:
    table = Table("persona", "version", "status", "kind", "parent", "metrics", title="Adapters")
    for r in figures["adapters"]:
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in r["metrics"].items()
                            if isinstance(v, float) and ("nll" in k or "reward" in k))
        table.add_row(r["persona"], f"v{r['version']}", r["status"], r["kind"] or "-",
                      f"v{r['parent_version']}" if r["parent_version"] else "-", metrics)
    out.print(table)
    table = Table("run", "persona", "kind", "status", "from", "to", "examples", "reward acc.", "margin",
                  title="Training runs")
    for r in figures["training_runs"]:
        table.add_row(r["id"], r["persona"], r["kind"], r["status"],
                      f"v{r['parent_version']}" if r["parent_version"] else "-",
                      f"v{r['adapter_version']}" if r["adapter_version"] else "-", str(r["train_examples"] or "-"),
                      _pct(r["reward_accuracy"]),
                      "-" if r["reward_margin"] is None else f"{r['reward_margin']:.3f}")
    out.print(table)


def export(args) -> None:
    from feedback import export, pairs

    target = Path(args.out)
    suffix = target.suffix.lower()
    if suffix not in (".parquet", ".jsonl"):
        raise UserError(f"--out {args.out}: the file name must end in .parquet or .jsonl")
    target.parent.mkdir(parents=True, exist_ok=True)
    db = open_data(args)
    try:
        known = export.personas_with_turns(db)
        if args.persona not in known:
            raise UserError(f"--persona {args.persona}: no turns of that persona in the store "
                            f"(personas with turns: {', '.join(sorted(known)) or 'none'})")
        pairs.build(db, args.persona, kinds=(args.format,))
        rows = export.write_table(db, f"pref_{args.format}", target, args.split)
    finally:
        db.close()
    err.print(f"{rows} {args.format} examples of {args.persona} ({args.split}) written to {target}")
