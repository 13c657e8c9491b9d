"""Every ``persona bench ...`` and ``persona simulate`` on an empty or half-set-up
``PERSONA_HOME`` says in one line what to run first, exits non-zero, and prints
no traceback.

Each command runs as a user runs it: ``python -m serve.cli`` in a child process,
all of them at once (each imports the CLI on its own), on a temporary home.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from serve.processes import free_port

BENCHES = [
    ["bench", "feedback", "--votes", "10", "--build-votes", "0"],
    ["bench", "load", "--seconds", "1"],
    ["bench", "serve"],
    ["bench", "sft"],
    ["bench", "train"],
    ["bench", "soak", "--minutes", "1"],
]


def run_all(commands: list[list[str]], home) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "PERSONA_HOME": str(home), "PERSONA_LOG_LEVEL": "WARNING"}
    procs = [subprocess.Popen([sys.executable, "-m", "serve.cli", *c], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for c in commands]
    results = []
    for command, proc in zip(commands, procs):
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # a bench that started servers: stop them with it
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def assert_one_line(result: subprocess.CompletedProcess, says: str) -> None:
    printed = (result.stdout + result.stderr).strip()
    assert result.returncode not in (0, None, -9), f"{result.args}: exit {result.returncode}\n{printed}"
    assert "Traceback" not in printed, f"{result.args}:\n{printed}"
    assert len(printed.splitlines()) == 1, f"{result.args}: more than one line:\n{printed}"
    assert says in printed, f"{result.args}: {printed!r} does not say {says!r}"


def test_every_bench_and_simulate_on_an_empty_home(persona_home):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: no gateway was started
    simulate = ["simulate", "--rater", "train.raters:shorter", "--persona", "teto", "--gateway", closed]
    results = run_all(BENCHES + [simulate], persona_home)
    for result in results[:-1]:
        assert_one_line(result, "run `persona setup` first")
    assert_one_line(results[-1], "start it first with `persona up` (after `persona setup`)")
    assert not (persona_home / "models").exists() or not any((persona_home / "models").iterdir()), \
        "a bench provisioned the base model instead of saying what to run"


def test_benches_that_serve_need_an_adapter_too(persona_home):
    """Half set up: the base model is provisioned (a stand-in folder), no persona has an adapter."""
    model = persona_home / "models" / "SmolLM2-135M-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    serving = [b for b in BENCHES if b[1] in ("feedback", "load", "serve", "soak")]
    for result in run_all(serving, persona_home):
        assert_one_line(result, "no persona has an adapter")
        assert "run `persona setup` first" in result.stderr
