"""``persona retrain``: one turn of the loop for a persona, now.

With a gateway running, it asks the gateway to start the run (the same
subprocess its scheduler starts); with ``--here``, or when no gateway answers,
it runs in this process.

    persona retrain --persona teto [--force] [--wait]
"""

from __future__ import annotations

import time

from rich.console import Console

from feedback.errors import UserError

console = Console(stderr=True)


def add_arguments(p) -> None:
    p.add_argument("--persona", required=True)
    p.add_argument("--force", action="store_true", help="train even with fewer pairs than the recipe's min_pairs")
    p.add_argument("--recipe", default="dpo", help="preference recipe (default: train/recipes/dpo.yaml)")
    p.add_argument("--gateway", default="http://127.0.0.1:7860", help="the running gateway")
    p.add_argument("--here", action="store_true", help="run in this process (the scheduler's subprocesses do)")
    p.add_argument("--wait", action="store_true", help="with a gateway: wait until the run has finished")
    p.add_argument("--timeout", type=float, default=3600, help="seconds --wait waits at most")
    p.set_defaults(func=retrain)


def retrain(args) -> int:
    from train.loop import GatewayClient, retrain as run_here
    from train.simulate import FINISHED

    client = None if args.here else GatewayClient.reachable(args.gateway)
    if client is None:
        run = run_here(args.persona, None if not args.here else args.gateway, args.force, args.recipe)
        return 0 if run["status"] in ("promoted", "skipped", "rejected") else 1
    asked = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    started = client._post("/admin/retrain", {"persona": args.persona, "force": args.force})
    console.print(f"the gateway started a retrain of {args.persona} (log: {started['log']})")
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        time.sleep(2)
        runs = client.http.get("/admin/runs", params={"persona": args.persona, "limit": 1}).json()["runs"]
        if runs and str(runs[0]["started_at"]) >= asked and runs[0]["status"] in FINISHED:
            run = runs[0]
            console.print(f"run {run['id']}: {run['status']} ({run.get('message')})")
            return 0 if run["status"] in ("promoted", "skipped", "rejected") else 1
        if time.monotonic() > deadline:
            raise UserError(f"no finished run of {args.persona} after {args.timeout:.0f} s; see {started['log']}")
