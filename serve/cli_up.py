"""``persona up``: engine, gateway (OpenAI API, browser UI) and retrain scheduler, in one command.

Part of the CLI root (with ``cli.py`` and ``cli_commands.py``): the only place
that wires ``train`` (the adapter registry, the base model) to ``serve``.

    persona up                                  # embedded engine, gateway on 127.0.0.1:7860
    persona up --engine vllm                    # a real vLLM server from PERSONA_VLLM_PYTHON
    persona up --engine-url http://h1:8001 --engine-url http://h2:8001   # existing replicas
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import time

from rich.console import Console

from feedback import settings
from feedback.errors import UserError

err = Console(stderr=True)


def load_catalog():
    """The gateway's view of the personas and the adapter registry."""
    from serve.gateway.catalog import Catalog, PersonaInfo
    from train import registry
    from train.personas import list_personas

    personas = {}
    for p in list_personas():
        active, candidate = registry.active(p.name), registry.candidate(p.name)
        versions = registry.versions(p.name)
        personas[p.name] = PersonaInfo(
            name=p.name, system_prompt=p.system_prompt, display_name=p.display_name, description=p.description,
            descriptions=dict(p.descriptions),
            active=active.version if active else None, candidate=candidate.version if candidate else None,
            versions={v.version: str(v.path) for v in versions},
            unservable=unservable(p.name, [v.version for v in versions]),
        )
    return Catalog(personas)


def registry_actions():
    """The registry's changes the gateway's A/B experiments make (serve does not import train):
    the challenger becomes the candidate (side by side), then active or retired."""
    from serve.gateway.experiments import RegistryActions
    from train import registry

    return RegistryActions(set_candidate=registry.set_candidate, promote=registry.set_active, retire=registry.retire)


def unservable(persona: str, versions: list[int]) -> dict[int, str]:
    """The versions the registry refuses to serve, with why (``registry.status``): ``rejected``
    (by the gate, or an engine that would not load it) and ``retired``, with their reasons."""
    from train import registry

    refused = {}
    for version in versions:
        state, reason = registry.status(persona, version)
        if state in ("rejected", "retired"):
            refused[version] = f"{state}: {reason}" if reason else state
    return refused


def add_arguments(parser) -> None:
    parser.add_argument("--engine", choices=["embedded", "vllm"], default="embedded",
                        help="which engine to start (default: embedded, transformers + peft)")
    parser.add_argument("--engine-url", action="append", default=[],
                        help="use an engine already running at this URL instead (repeat for replicas)")
    parser.add_argument("--engine-key", help="bearer key of the --engine-url engines "
                                             "(default: PERSONA_ENGINE_API_KEY, which keeps it out of `ps`)")
    parser.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    parser.add_argument("--port", type=int, default=7860, help="gateway port")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--database", help="feedback store file (default: PERSONA_HOME/feedback.duckdb)")
    parser.add_argument("--vote-batch", type=int, default=512,
                        help="most votes written in one transaction (concurrent votes are committed together)")
    parser.add_argument("--min-new-pairs", type=int, default=32,
                        help="the scheduler retrains a persona once it has this many new preference pairs")
    parser.add_argument("--retrain-interval", type=float, default=3600,
                        help="seconds between two scheduled retrains of one persona, at least")
    parser.add_argument("--no-scheduler", action="store_true", help="no scheduled retraining")
    parser.add_argument("--max-in-flight", type=int, default=64,
                        help="chat requests served at once; more get 429 with Retry-After at once")
    parser.add_argument("--forwarded-allow-ips", default="",
                        help="comma-separated addresses of reverse proxies whose X-Forwarded-For and "
                             "X-Forwarded-Proto headers are believed (default: none, not even loopback's)")
    parser.add_argument("--drain-seconds", type=float, default=30.0,
                        help="on SIGTERM, how long running requests may take to finish (new ones get 503)")
    parser.add_argument("--retrain-recipe", default="dpo", help="preference recipe of the runs (name or YAML file)")
    parser.add_argument("--vllm-arg", action="append", default=[],
                        help="extra argument for the vLLM server (repeatable), e.g. --vllm-arg=--dtype=bfloat16")


def engine_args(port: int, max_model_len: int) -> list[str]:
    """``persona engine`` as ``persona up`` runs it: a child process (its decode loop then
    never competes with the gateway's event loop for the interpreter lock), loopback,
    no adapters of its own (the gateway loads them)."""
    return ["engine", "--port", str(port), "--no-adapters", "--max-model-len", str(max_model_len)]


def log_file(name: str):
    return settings.runs_dir() / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def engine_pool(args, catalog, stack: contextlib.ExitStack):
    """The engines ``persona up`` serves from: the ``--engine-url`` replicas, or one it starts
    (vLLM, or the embedded engine in a child process, started again if it dies). What it
    starts stops when ``stack`` closes."""
    from serve.engine.vllm_launcher import LaunchError, VLLMConfig, VLLMServer
    from serve.gateway.engines import EnginePool
    from serve.processes import child_server, free_port
    from train import base_model

    if args.engine_url:
        return EnginePool(args.engine_url, api_key=args.engine_key or settings.get("PERSONA_ENGINE_API_KEY") or None)
    key = secrets.token_hex(24)
    if args.engine == "vllm":
        config = VLLMConfig(python=str(settings.get("PERSONA_VLLM_PYTHON")), model=base_model.resolve(),
                            adapters=[t.path for t in catalog.active_targets()], port=free_port(), api_key=key,
                            max_model_len=args.max_model_len, extra_args=args.vllm_arg, log_file=str(log_file("vllm")))
        err.print(f"starting vLLM on 127.0.0.1:{config.port} (log: {config.log_file}); this takes a minute")
        try:
            server = stack.enter_context(VLLMServer(config))
        except LaunchError as exc:
            raise UserError(str(exc)) from None
        return EnginePool([server.url], api_key=key)
    base_model.resolve()  # provision before the engine needs it
    port, log = free_port(), log_file("engine")
    err.print(f"embedded engine starting on 127.0.0.1:{port} (log: {log})")
    engine = stack.enter_context(child_server(engine_args(port, args.max_model_len), port, log,
                                              env={"PERSONA_ENGINE_API_KEY": key}))
    pool = EnginePool([engine.url], api_key=key)
    pool.restart[engine.url] = engine.supervisor.restart_if_dead
    return pool


def reconcile_registry() -> None:
    """Finish or undo the promotions a killed run left in progress (the registry's pointer
    may name a version no gateway loaded), before the gateway reads the registry."""
    from train import registry

    for note in registry.reconcile():
        err.print(f"[yellow]{note}[/]")


def up(args) -> None:
    import uvicorn

    from feedback.store import Store
    from serve.gateway.app import create_gateway_app
    from serve.gateway.core import Gateway, GatewayConfig
    from serve.gateway.edge import server_options, with_bind_host

    _check_port_free(args.host, args.port)
    reconcile_registry()
    catalog = load_catalog()
    if not catalog.active_targets():
        raise UserError("no persona has an adapter yet: run `persona setup` first")
    store = Store.open(args.database)
    with contextlib.ExitStack() as stack:
        stack.callback(store.close)
        pool = engine_pool(args, catalog, stack)
        gateway = Gateway(load_catalog, pool, store, GatewayConfig(
            api_keys=settings.get("PERSONA_API_KEY"), admin_keys=settings.get("PERSONA_ADMIN_KEY"),
            vote_batch=max(1, args.vote_batch), max_in_flight=max(1, args.max_in_flight),
            shutdown_timeout=args.drain_seconds, allowed_hosts=with_bind_host(allowed_hosts(args.host), args.host),
            forwarded_allow_ips=tuple(ip.strip() for ip in args.forwarded_allow_ips.split(",") if ip.strip())),
            registry=registry_actions())
        err.print(f"gateway on http://{args.host}:{args.port}/v1 (personas: "
                  f"{', '.join(t.model_id for t in catalog.active_targets())}); database {store.path}")
        # uvicorn re-raises the SIGTERM it handled once it has shut down; as an exception
        # (not the default action, which kills at once) it unwinds this stack, so the
        # engine or vLLM server this command started is stopped too.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        from serve.gateway.scheduler import ScheduleConfig, Scheduler
        from serve.processes import url_of
        from train.recipes import DPORecipe, load_recipe

        # The scheduler counts new pairs, and their voters, by the runs' own recipe (serve does not import train).
        recipe = load_recipe(args.retrain_recipe, DPORecipe)
        gateway.scheduler = Scheduler(gateway, ScheduleConfig(
            enabled=not args.no_scheduler, min_new_pairs=args.min_new_pairs, interval=args.retrain_interval,
            gateway_url=url_of(args.host, args.port), log_dir=settings.runs_dir() / "logs",
            recipe=args.retrain_recipe, rules=recipe.pair_rules(), min_voters=recipe.min_voters))
        app = create_gateway_app(gateway, ui_users=settings.get("PERSONA_UI_USERS"))
        err.print(f"browser UI on http://{args.host}:{args.port}/")
        from serve.gateway.drain import DrainingServer

        freeze_startup_objects()
        DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                      **server_options(gateway.config)), gateway).run()


def allowed_hosts(bind: str) -> tuple[str, ...]:
    """PERSONA_ALLOWED_HOSTS, with a warning when the gateway listens on every address but
    answers only to loopback names (a remote browser or client asking for this machine by
    its name would get 403)."""
    from serve.gateway.edge import WILDCARD_BINDS

    hosts = settings.get("PERSONA_ALLOWED_HOSTS")
    if bind.strip("[]") in WILDCARD_BINDS and hosts == settings.LOOPBACK_NAMES:
        err.print(f"[yellow]listening on {bind}, but PERSONA_ALLOWED_HOSTS allows only loopback names "
                  f"({', '.join(hosts)}): set it to the names clients use for this machine (or '*')[/]")
    return hosts


def freeze_startup_objects() -> None:
    """Keep what start-up imported and built (gradio, fastapi, pydantic: about 165,000 objects,
    all living as long as the process) out of the garbage collector's full collections.
    Walking them took about 90 ms of CPU each time, on the event loop, and the requests
    waiting behind one were the tail of the vote latency in `persona bench feedback`."""
    import gc

    gc.collect()
    gc.freeze()


def _check_port_free(host: str, port: int) -> None:
    """Fail before starting an engine, not after, when the gateway's port is taken."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot serve on {host}:{port}: {exc.strerror} (is another `persona up` running? "
                            "pick another --port)") from None


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
