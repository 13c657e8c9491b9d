"""``persona retrain``: one turn of the loop for a persona, now.

With a gateway running, it asks the gateway to start the run (the same
subprocess its scheduler starts); with ``--here``, or when no gateway answers,
it runs in this process (``train.loop.retrain``). The scheduler's subprocesses
pass ``--snapshot``, the snapshot the gateway took for them, so they never ask
their parent for one.

    persona retrain --persona teto [--force] [--wait] [--promotion gate|ab]
    persona retrain --persona teto --here [--snapshot DIR] [--gateway URL]
"""

from __future__ import annotations

from rich.console import Console


console = Console(stderr=True)


def add_arguments(p) -> None:
    p.add_argument("--persona", required=True)
    p.add_argument("--force", action="store_true", help="train even with fewer pairs than the recipe's min_pairs")
    p.add_argument("--recipe", default="dpo", help="preference recipe (default: train/recipes/dpo.yaml)")
    p.add_argument("--gateway", default="http://127.0.0.1:7860", help="the running gateway")
    p.add_argument("--here", action="store_true", help="run in this process (the scheduler's subprocesses do)")
    p.add_argument("--snapshot", help="with --here: read this feedback snapshot folder instead of asking the "
                                      "gateway for one (the scheduler passes the one it took)")
    p.add_argument("--wait", action="store_true", help="with a gateway: wait until the run has finished")
    p.add_argument("--timeout", type=float, default=3600, help="seconds --wait waits at most")
    p.add_argument("--promotion", choices=["gate", "ab"],
                   help="how a candidate that passes the gate is promoted: at once (gate), or after an A/B "
                        "experiment that users' side-by-side verdicts decide (ab); default: the recipe's")
    p.set_defaults(func=retrain)


def retrain(args) -> int:
    from train.loop import GatewayClient, retrain as run_here

    client = None if args.here else GatewayClient.reachable(args.gateway)
    if client is None:
        run = run_here(args.persona, None if not args.here else args.gateway, args.force, args.recipe,
                       args.snapshot if args.here else None, promotion=args.promotion)
    else:
        started = client.retrain(args.persona, args.force, args.promotion)
        console.print(f"the gateway started a retrain of {args.persona} (log: {started['log']})")
        if not args.wait:
            return 0
        run = client.wait_for_run(args.persona, started["asked"], args.timeout)
        console.print(f"run {run['id']}: {run['status']} ({run.get('message')})")
    return 0 if run["status"] in ("promoted", "skipped", "rejected", "challenger", "retired") else 1
