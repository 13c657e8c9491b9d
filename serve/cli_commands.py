"""The bodies of the ``persona`` subcommands (the parser is in ``serve/cli.py``).

This is the CLI root, so it may import ``serve``, ``train`` and ``feedback``.
"""

from __future__ import annotations

import argparse
import time

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
    console.print(f"Base model ready: {path}")


def setup(args) -> None:
    """Provision the base model, then train every persona that has no active adapter."""
    from train import base_model, registry, sft
    from train.personas import list_persona_names, load_persona
    from train.recipes import load_recipe

    base = base_model.resolve()
    console.print(f"Base model ready: {base}")
    names = args.persona or list_persona_names()
    for name in names:
        persona = load_persona(name)
        current = registry.active(name)
        if current is not None:
            console.print(f"{name}: adapter {current.name} is active")
            continue
        console.print(f"{name}: no adapter yet, training one (SFT)")
        sft.run(persona, load_recipe(persona.recipe), base)


def train_sft(args) -> None:
    from train import sft

    sft.main(args)


def adapters_list(args) -> None:
    from train import registry
    from train.personas import list_persona_names

    table = Table("persona", "version", "status", "kind", "held-out NLL", "vs base", "created", "path")
    for name in [args.persona] if args.persona else list_persona_names():
        for v in registry.versions(name):
            m = v.meta.get("metrics", {})
            nll = m.get("heldout_nll_adapter")
            red = m.get("heldout_nll_reduction")
            status, reason = registry.status(name, v.version)
            table.add_row(
                name, f"v{v.version}", f"{status}: {reason}" if reason else status,
                v.meta.get("kind", "?"), f"{nll:.3f}" if nll is not None else "-",
                f"-{red:.1%}" if red is not None else "-", v.meta.get("created_at", "?"), str(v.path),
            )
    console.print(table)


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


def chat(args) -> None:
    """Answer one message with the persona's adapter, in this process."""
    from serve.local_chat import generate_reply
    from train import base_model, registry
    from train.personas import load_persona

    persona = load_persona(args.persona)
    adapter = registry.get(persona.name, args.version) if args.version else registry.active(persona.name)
    if adapter is None:
        raise UserError(f"{persona.name} has no adapter yet: run `persona train sft --persona {persona.name}`")
    base = adapter.meta.get("base_model") or base_model.resolve()
    started = time.time()
    reply = generate_reply(
        base, str(adapter.path), persona.system_prompt, args.message,
        max_new_tokens=args.max_tokens, temperature=args.temperature,
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
