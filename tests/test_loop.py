"""The continual loop end to end on the tiny model: simulated votes through the API,
a retrain through the gateway, the gate, promotion, rollback; and a hot swap under load."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import make_lora, write_jsonl


@pytest.fixture
def tiny_home(tmp_path, tiny_model_dir, monkeypatch):
    """Persona 'tiny' (train and held-out dialogues) with an active random adapter v1."""
    from train import registry

    personas = tmp_path / "personas"
    for split, n in (("train", 40), ("heldout", 6)):
        write_jsonl(personas / "data" / f"{split}.jsonl", [
            {"messages": [{"role": "user", "content": f"{split} question number {i}?"},
                          {"role": "assistant", "content": "Do it now."}]} for i in range(n)])
    (personas / "tiny.yaml").write_text(
        "name: tiny\ndisplay_name: Tiny\ndescription: test\nsystem_prompt: Be short.\nlanguages: [en]\n"
        "data:\n  train: [{path: data/train.jsonl, language: en}]\n"
        "  heldout: [{path: data/heldout.jsonl, language: en}]\n")
    env = {"PERSONA_PERSONAS_DIR": str(personas), "PERSONA_BASE_MODEL": str(tiny_model_dir)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    staging = registry.staging_dir("tiny")
    make_lora(tiny_model_dir, staging, seed=5, rank=8)
    registry.set_active("tiny", registry.commit("tiny", staging, {"kind": "sft"}).version)
    return env


def served_version(url: str) -> int:
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 1,
                                                       "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    return int(r.json()["model"].split("@v")[1])


def test_simulated_votes_retrain_gate_promote_rollback(tiny_home, tmp_path):
    from test_cli import persona
    from serve.processes import free_port, persona_process
    from train import registry

    # The tiny random model needs bigger steps than the real one to learn a taste in one round,
    # and no RPO anchor: its NLL per token (about 11 nats, a random model) would swamp the DPO term.
    fast = tmp_path / "fast.yaml"
    # ab_share 0: the API share is sticky per client at random, so this client could be sent to the
    # challenger (tests/test_experiments.py covers the share); here it must see the active version.
    fast.write_text("learning_rate: 2.0e-3\nepochs: 3\nheldout_percent: 30\nrpo_alpha: 0\nab_min_votes: 10\n"
                    "ab_share: 0\n")
    port = free_port()
    with persona_process(["up", "--port", str(port), "--no-scheduler", "--retrain-recipe", str(fast)], port,
                         tmp_path / "up.log", env=tiny_home) as url:
        assert served_version(url) == 1
        sim = persona("simulate", "--rater", "tests.rating:fewer_characters", "--persona", "tiny",
                      "--rounds", "1", "--pairs-per-round", "64", "--max-tokens", "12", "--heldout", "4",
                      # at 1.0 the random model's two samples differ in length on most prompts, so one
                      # round of the length taste gives it enough decisive pairs to learn from
                      "--temperature", "1.0",
                      "--promotion", "gate", "--gateway", url, env={**tiny_home, "COLUMNS": "200"}, timeout=900)
        assert sim.returncode == 0, sim.stderr[-3000:] + sim.stdout[-3000:]
        assert "promoted" in sim.stdout, sim.stdout
        assert served_version(url) == 2                       # the new version answers under the persona name
        assert registry.active("tiny").version == 2
        runs = httpx.get(url + "/admin/runs", params={"persona": "tiny"}).json()["runs"]
        assert runs[0]["status"] == "promoted" and runs[0]["parent_version"] == 1
        assert runs[0]["adapter_version"] == 2 and runs[0]["reward_accuracy"] > 0.5
        assert runs[0]["metrics"]["reward_model"]["train_pairs"] > 0       # the record carries the run's metrics
        comparisons = httpx.post(url + "/admin/snapshot").json()["path"]
        assert comparisons

        rolled = persona("adapters", "rollback", "--persona", "tiny", "--gateway", url, env=tiny_home)
        assert rolled.returncode == 0, rolled.stderr
        assert served_version(url) == 1

        # A candidate that fails the gate is kept on disk but never served.
        strict = tmp_path / "strict.yaml"
        strict.write_text("min_reward_accuracy: 1.0\nepochs: 1\nmin_voters: 1\npromotion: gate\n")  # one simulated voter
        rejected = persona("retrain", "--persona", "tiny", "--here", "--gateway", url, "--recipe", str(strict),
                           env=tiny_home, timeout=900)
        assert rejected.returncode == 0, rejected.stderr[-3000:]
        said = " ".join(rejected.stderr.split())
        assert "rejected" in said and "not above 1.00" in said
        assert [v.version for v in registry.versions("tiny")] == [1, 2, 3]
        assert registry.active("tiny").version == 1 and served_version(url) == 1
        runs = httpx.get(url + "/admin/runs", params={"persona": "tiny"}).json()["runs"]
        assert runs[0]["status"] == "rejected" and "reward accuracy" in runs[0]["message"]

        # A/B: the next candidate passes the gate and challenges v1; simulated side-by-side votes
        # (a voter who prefers the challenger's answers) decide, and it is promoted.
        ab = persona("retrain", "--persona", "tiny", "--gateway", url, "--promotion", "ab", "--force", "--wait",
                     env=tiny_home, timeout=900)
        assert ab.returncode == 0, ab.stderr[-3000:] + ab.stdout[-3000:]
        runs = httpx.get(url + "/admin/runs", params={"persona": "tiny"}).json()["runs"]
        assert runs[0]["status"] == "challenger" and runs[0]["adapter_version"] == 4, runs[0]
        assert registry.candidate("tiny").version == 4 and served_version(url) == 1
        experiment = vote_until_decided(url, "tiny", active=1, challenger=4)
        assert experiment["status"] == "promoted" and experiment["figures"]["low"] > 0.5
        assert experiment["figures"]["votes"] >= 10                      # ab_min_votes
        assert served_version(url) == 4 and registry.active("tiny").version == 4
        assert httpx.get(url + "/admin/runs", params={"persona": "tiny"}).json()["runs"][0]["status"] == "promoted"


def vote_until_decided(url: str, persona: str, active: int, challenger: int, limit: int = 80) -> dict:
    """Side-by-side votes for the challenger's answer until the experiment is decided."""
    for i in range(limit):
        turns = [httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": f"{persona}@v{v}", "messages": [{"role": "user", "content": f"question {i}"}],
            "max_tokens": 4, "seed": i}).json()["id"] for v in (active, challenger)]
        r = httpx.post(url + "/v1/comparisons", json={"turn_a": turns[0], "turn_b": turns[1], "choice": "b",
                                                      "left": "a" if i % 2 else "b"})
        assert r.status_code == 200, r.text
        experiment = httpx.get(url + "/admin/experiments", params={"persona": persona}).json()["experiments"][0]
        if experiment["status"] != "running":
            return experiment
        time.sleep(0.05)  # the gateway reads the verdicts in a task of its own
    raise AssertionError(f"undecided after {limit} votes: {experiment}")


def test_hot_swap_under_streaming_load(tiny_model_dir, tmp_path):
    """8 clients stream without pause while teto is promoted from v1 to v2: no request fails
    or is cut short, and a request sent within 2 s of the promotion call is answered by v2."""
    from contract_stack import ADMIN_KEY, API_KEY, catalog, stack

    with stack("embedded", tiny_model_dir, tmp_path) as s:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        stop, results, first_v2 = threading.Event(), [], []

        def client():
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    began = time.monotonic()
                    body = {"model": "teto", "stream": True, "max_tokens": 16, "temperature": 0,
                            "messages": [{"role": "user", "content": "go"}]}
                    with http.stream("POST", s.url + "/v1/chat/completions", json=body, headers=headers) as r:
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                    model = next((line for line in lines if '"model"' in line), "")
                    results.append((r.status_code, lines[-1] if lines else "", "teto@v2" in model, began))
                    if "teto@v2" in model:
                        first_v2.append(began)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(3)
        s.state["catalog"] = catalog(s.adapters, teto_active=2)
        promoted = time.monotonic()
        r = httpx.post(s.url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        assert r.json()["active"]["teto"] == "teto-v2"
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join()
        assert len(results) > 16
        assert all(status == 200 and last == "data: [DONE]" for status, last, _, _ in results)
        assert first_v2 and min(first_v2) - promoted < 2.0
        assert all(v2 for _, _, v2, began in results if began > promoted + 2.0)   # after the swap, only v2


def test_scheduler_starts_a_run_when_enough_new_pairs(tmp_path, monkeypatch):
    """The scheduler counts new pairs since the persona's last run that trained (a count query
    that leaves out turns with the caller's own system prompt, as the recipe's rules do), respects the interval, runs one retrain per persona at a time on a snapshot it took itself,
    and records a run whose process died."""
    import asyncio
    from types import SimpleNamespace

    from feedback import pairs, runs
    from feedback.errors import APIError
    from feedback.store import Store, Turn
    from feedback.votes import record_vote
    from serve.gateway import scheduler as scheduling
    from serve.gateway.catalog import Catalog, PersonaInfo
    from serve.gateway.scheduler import ScheduleConfig, Scheduler

    store = Store.open(tmp_path / "f.duckdb")
    for i in range(6):  # 3 contexts x (up, down) = 3 pairs
        store.add_turn(Turn(id=f"t{i}", requested_model="teto", messages=[{"role": "user", "content": f"q{i // 2}"}],
                            answers=[f"answer {i}"], finish_reasons=["stop"], sampling={}, stream=False,
                            latency_ms=1, client="c", persona="teto", adapter="teto-v1", adapter_version=1))
        record_vote(store, f"t{i}", "up" if i % 2 else "down", "c")
    own = Turn(id="own", requested_model="teto", messages=[{"role": "system", "content": "mine"}], answers=["x"],
               finish_reasons=["stop"], sampling={}, stream=False, latency_ms=1, client="c", persona="teto",
               adapter="teto-v1", adapter_version=1, own_system_prompt=True)
    store.add_turn(own)
    store.add_turn(Turn(**{**own.__dict__, "id": "own2", "answers": ["y"]}))
    record_vote(store, "own", "up", "c")
    record_vote(store, "own2", "down", "c")      # a pair only when the rules take such turns
    snapshots = []

    def snapshot() -> str:
        snapshots.append(str(store.snapshot(tmp_path / f"s{len(snapshots)}")))
        return snapshots[-1]

    gateway = SimpleNamespace(store=store, snapshot=snapshot,
                              catalog=Catalog({"teto": PersonaInfo("teto", "x", active=1, versions={1: "/a"})}))
    rules = pairs.PairRules(voter_cap=7, heldout_percent=30)
    monkeypatch.setattr(scheduling, "POLL_SECONDS", 0.05)
    scheduler = Scheduler(gateway, ScheduleConfig(min_new_pairs=3, interval=0, log_dir=tmp_path, rules=rules))
    started, script = [], ["import time; time.sleep(1)"]
    scheduler.command = lambda persona, force, snapshot: started.append(snapshot) or [sys.executable, "-c", script[0]]

    async def scenario():
        assert scheduler.pending("teto") == (3, 1)
        scheduler.config.rules = pairs.PairRules(include_own_system_prompt=True)
        assert scheduler.pending("teto") == (4, 1)                       # the recipe's rules, not the defaults
        scheduler.config.rules = rules
        assert await scheduler.tick() == ["teto"]
        assert await scheduler.tick() == []                              # one run per persona at a time
        with pytest.raises(APIError) as busy:
            scheduler.launch("teto")
        assert busy.value.status == 409
        assert await scheduler.running["teto"] == 0
        assert started == snapshots and (Path(started[0]) / "votes.parquet").is_file()  # the snapshot it took
        later = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() + 2))  # after every vote
        store.record_run({"id": "r1", "persona": "teto", "kind": "dpo", "status": "promoted",
                          "started_at": later, "train_examples": 3, "heldout_examples": 0})
        assert scheduler.pending("teto") == (0, 0) and await scheduler.tick() == []  # nothing new since r1
        assert runs.last_trained_start(store, "teto") is not None
        scheduler.config.interval = 3600
        store.record_run({"id": "r1", "persona": "teto", "kind": "dpo", "status": "promoted",
                          "started_at": "2026-01-01", "train_examples": 0, "heldout_examples": 0})
        assert scheduler.pending("teto")[0] == 3
        assert await scheduler.tick() == []                              # enough pairs, but inside the interval
        # A run process that died cannot record its end: the scheduler records it failed.
        store.record_run({"id": "r2", "persona": "teto", "kind": "dpo", "status": "running",
                          "started_at": "2026-01-02"})
        script[0] = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
        scheduler.launch("teto")
        assert await scheduler.running["teto"] == -9

    asyncio.run(scenario())
    status, message = store.query("SELECT status, message FROM training_runs WHERE id = 'r2'")[0]
    assert status == "failed" and message.startswith("interrupted") and "exit code -9" in message
    with pytest.raises(APIError) as unknown:
        scheduler.launch("nobody")
    assert unknown.value.status == 404
    command = Scheduler(gateway, ScheduleConfig(recipe="r.yaml")).command("teto", True, "/snap")
    assert command[command.index("--snapshot") + 1] == "/snap" and "--here" in command and "--force" in command
    store.close()


def test_recipe_gives_the_scheduler_its_pair_rules(tmp_path):
    """`persona up` hands the scheduler the pair rules of --retrain-recipe (serve cannot read recipes)."""
    from feedback.pairs import PairRules
    from train.recipes import DPORecipe, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("voter_cap: 7\nheldout_percent: 30\n")
    assert load_recipe(str(recipe), DPORecipe).pair_rules() == PairRules(voter_cap=7, heldout_percent=30)
