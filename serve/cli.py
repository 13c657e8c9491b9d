"""The ``persona`` command line: one console script, one subcommand per job.

    persona setup                  provision the base model, train missing adapters
    persona provision              convert the base model to safetensors (once)
    persona train sft --persona teto [--recipe FILE] [--qlora]
    persona train dpo --persona teto --data FILE.parquet [--recipe FILE] [--force]
    persona adapters list|promote|rollback|candidate
    persona experiments list [--persona teto] | stop ID
    persona chat --persona teto "message"
    persona up [--engine embedded|vllm] [--port 7860]
    persona engine [--port 8001]
    persona retrain --persona teto [--force] [--wait]
    persona simulate --rater train.raters:shorter --persona teto [--rounds 3] [--pairs-per-round 64]
    persona feedback stats | export --format dpo|kto|sft --persona teto --out FILE
    persona data check [FILE ...]
    persona bench sft | serve | train | feedback | load [--users 50 --seconds 60] | soak [--minutes 20]
    persona settings

Each command is a ``main(args)`` behind a parser; nothing is loaded at import
time. A mistake the user can fix (``UserError``) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from feedback import settings
from feedback.errors import UserError


# `persona bench NAME`: its module in bench/ (each has add_arguments and main) and what it prints.
BENCHES = {
    "sft": ("sft_speed", "SFT step time: our recipe against TRL's defaults"),
    "serve": ("serve_speed", "streaming throughput: embedded engine against a naive server"),
    "train": ("train_speed", "DPO step time: our recipe against TRL's defaults and plain fwd+bwd"),
    "feedback": ("feedback_speed", "votes per second through the API, latency, none lost"),
    "load": ("load", "many users chatting and voting at once: TTFT, refusals, no vote lost"),
    "soak": ("soak", "steady chats and votes at 70% of capacity for minutes: RSS growth, errors, lost votes"),
}


def build_parser() -> argparse.ArgumentParser:
    from serve import cli_commands as c

    parser = argparse.ArgumentParser(prog="persona", description="Persona chatbots that learn from their users.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _training_commands(sub, c)
    _adapter_and_data_commands(sub, c)
    _experiment_commands(sub, c)
    _serving_commands(sub, c)
    _bench_commands(sub)
    p = sub.add_parser("settings", help="show every environment variable, its value and meaning")
    p.set_defaults(func=c.show_settings)
    return parser


def _training_commands(sub, c) -> None:
    """setup, provision, train sft|dpo."""
    p = sub.add_parser("setup", help="provision the base model and train any persona without an adapter")
    p.add_argument("--persona", action="append", help="only these personas (repeatable)")
    p.set_defaults(func=c.setup)

    p = sub.add_parser("provision", help="convert the base model to a safetensors folder (once)")
    p.add_argument("--base-model", help="base model (default: PERSONA_BASE_MODEL)")
    p.set_defaults(func=c.provision)

    train = sub.add_parser("train", help="train adapters").add_subparsers(dest="kind", required=True, metavar="KIND")
    p = train.add_parser("sft", help="supervised fine-tuning of a persona's LoRA adapter")
    from train import sft

    sft.add_arguments(p)
    p.set_defaults(func=c.train_sft)
    p = train.add_parser("dpo", help="DPO/KTO step: preference data in, a candidate adapter out (not activated)")
    from train import dpo

    dpo.add_arguments(p)
    p.set_defaults(func=dpo.main)


def _adapter_and_data_commands(sub, c) -> None:
    """adapters list|promote|rollback|candidate, chat, data check."""
    adapters = sub.add_parser("adapters", help="list, promote or roll back adapter versions")
    asub = adapters.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = asub.add_parser("list", help="versions of each persona, with the active one marked")
    p.add_argument("--persona")
    p.set_defaults(func=c.adapters_list)
    gateway_help = "the running gateway to hot-swap (default http://127.0.0.1:7860; none running is fine)"
    p = asub.add_parser("promote", help="make a version the persona's active adapter")
    p.add_argument("--persona", required=True)
    p.add_argument("--version", required=True, type=c.version_number)
    p.add_argument("--gateway", default="http://127.0.0.1:7860", help=gateway_help)
    p.set_defaults(func=c.adapters_promote)
    p = asub.add_parser("rollback", help="go back to the previously active version")
    p.add_argument("--persona", required=True)
    p.add_argument("--gateway", default="http://127.0.0.1:7860", help=gateway_help)
    p.set_defaults(func=c.adapters_rollback)
    p = asub.add_parser("candidate", help="test a version against the active one in the side-by-side view")
    p.add_argument("--persona", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--version", type=c.version_number)
    group.add_argument("--clear", action="store_true", help="stop testing a candidate")
    p.add_argument("--gateway", default="http://127.0.0.1:7860", help=gateway_help)
    p.set_defaults(func=c.adapters_candidate)

    p = sub.add_parser("chat", help="answer one message as a persona (loads the model in this process)")
    p.add_argument("--persona", required=True)
    p.add_argument("--version", type=c.version_number, help="adapter version (default: the active one)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    p.add_argument("--repetition-penalty", type=float,
                   help="vLLM's repetition_penalty: tokens already said are made less likely (1 turns it off; "
                        "default: the UI's, 1.1)")
    p.add_argument("message", help="the user's message")
    p.set_defaults(func=c.chat)

    data = sub.add_parser("data", help="dialogue datasets").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = data.add_parser("check", help="validate dataset files (default: every persona's data)")
    p.add_argument("files", nargs="*", help=".jsonl/.json files to check")
    p.add_argument("--language", default="en", help="language of records in the given files")
    p.set_defaults(func=c.data_check)


def _experiment_commands(sub, c) -> None:
    """experiments list|stop: the A/B experiments of challengers against the active versions."""
    experiments = sub.add_parser("experiments", help="A/B experiments: challengers against the active versions")
    esub = experiments.add_subparsers(dest="action", required=True, metavar="ACTION")

    def common(p):
        p.add_argument("--gateway", default="http://127.0.0.1:7860",
                       help="the running gateway (when none answers, the store file is read directly)")
        p.add_argument("--database",
                       help="the store file when no gateway runs (default: PERSONA_HOME/feedback.duckdb)")

    p = esub.add_parser("list", help="experiments, newest first: votes, win rate with its interval, thumbs, decision")
    p.add_argument("--persona")
    p.add_argument("--limit", type=int, default=20)
    common(p)
    p.set_defaults(func=c.experiments_list)
    p = esub.add_parser("stop", help="stop a running experiment: its challenger is retired, the active version stays")
    p.add_argument("id", help="the experiment's id (experiments list shows it)")
    common(p)
    p.set_defaults(func=c.experiments_stop)


def _serving_commands(sub, c) -> None:
    """up, retrain, simulate, feedback stats|export, engine."""
    p = sub.add_parser("up", help="start everything: engine and gateway (OpenAI API on 127.0.0.1:7860)")
    from serve import cli_up

    cli_up.add_arguments(p)
    p.set_defaults(func=cli_up.up)

    p = sub.add_parser("retrain", help="retrain a persona from its preference data now (gate, then promote)")
    from serve import cli_loop

    cli_loop.add_arguments(p)

    p = sub.add_parser("simulate", help="drive the loop through the API with a scripted rater")
    from train import simulate

    simulate.add_arguments(p)

    fb = sub.add_parser("feedback", help="feedback statistics and preference-data export")
    from serve import cli_feedback

    cli_feedback.add_arguments(fb.add_subparsers(dest="action", required=True, metavar="ACTION"))

    p = sub.add_parser("engine", help="serve the embedded engine (vLLM's OpenAI protocol) with the active adapters")
    p.add_argument("--host", default="127.0.0.1", help="bind address (keep it on loopback: the engine has no auth)")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--max-model-len", type=int, default=2048, help="prompt + completion tokens per sequence")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together")
    p.add_argument("--no-adapters", action="store_true", help="start with the base model only")
    p.add_argument("--max-lora-rank", type=int, default=64, help="adapters of a higher rank are refused")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weights and activations (auto: bfloat16 where the hardware has native bf16)")
    p.set_defaults(func=c.engine)


def _bench_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print comparable figures")
    bsub = bench.add_subparsers(dest="which", required=True, metavar="WHICH")
    for name, (module_name, help_text) in BENCHES.items():
        module = importlib.import_module(f"bench.{module_name}")
        p = bsub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=module.main)


def main(argv: list[str] | None = None) -> int:
    try:
        level = settings.get("PERSONA_LOG_LEVEL")
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))  # a line per call
        args = build_parser().parse_args(argv)
        result = args.func(args)
        return result if isinstance(result, int) else 0
    except UserError as exc:
        print(f"persona: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("persona: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
