"""A/B promotion end to end on the tiny model: a registered version becomes a challenger
(``POST /admin/experiments``), side-by-side rounds and a sticky share of API clients go to it,
verdicts posted through the real API (the official ``openai`` client for the chat, httpx for
the comparisons and thumbs) promote or retire it, a time limit retires it on the scheduler's
tick, and the CLI lists and stops experiments.

One gateway for the module (the embedded engine on the tiny random model, a real DuckDB
store, the real adapter registry and its functions as ``persona up`` wires them), and one
persona per test, so the tests do not depend on each other's order.
"""

from __future__ import annotations

import shutil
import time

import httpx
import openai
import pytest

from conftest import make_lora, write_jsonl
from serve.gateway import auth

ADMIN_KEY = "exp-admin-key"
KEYS = tuple(f"exp-key-{i}" for i in range(12))
PERSONAS = ("share", "win", "lose", "late", "cli", "twice", "spare", "hand")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def environment(root, tiny_model_dir) -> dict:
    return {"PERSONA_HOME": str(root / "home"), "PERSONA_PERSONAS_DIR": str(root / "personas"),
            "PERSONA_BASE_MODEL": str(tiny_model_dir), "PERSONA_ADMIN_KEY": ADMIN_KEY}


@pytest.fixture(autouse=True)
def persona_home(root, tiny_model_dir, monkeypatch):
    """Overrides conftest's: every test here works in the module gateway's PERSONA_HOME, whose
    registry the gateway changes."""
    for name, value in environment(root, tiny_model_dir).items():
        monkeypatch.setenv(name, value)
    return root / "home"


def make_personas(root, tiny_model_dir) -> None:
    """Each persona with v1 (active) and v2 (registered) adapters."""
    from train import registry

    loras = [make_lora(tiny_model_dir, root / f"lora{seed}", seed, rank=8) for seed in (21, 22)]
    personas = root / "personas"
    write_jsonl(personas / "data" / "train.jsonl", [
        {"messages": [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "Do it."}]}])
    for name in PERSONAS:
        (personas / f"{name}.yaml").write_text(
            f"name: {name}\ndisplay_name: {name.title()}\ndescription: test\nsystem_prompt: Be {name}.\n"
            "languages: [en]\ndata:\n  train: [{path: data/train.jsonl, language: en}]\n"
            "  heldout: [{path: data/train.jsonl, language: en}]\n")
        for lora in loras:
            staging = registry.staging_dir(name)
            shutil.copytree(lora, staging, dirs_exist_ok=True)
            registry.commit(name, staging, {"kind": "sft"})
        registry.set_active(name, 1)


@pytest.fixture(scope="module")
def s(root, tiny_model_dir):
    from feedback.store import Store
    from serve.cli_up import load_catalog, registry_actions
    from serve.engine.embedded import EmbeddedEngine
    from serve.engine.routes import create_app
    from serve.gateway.app import create_gateway_app
    from serve.gateway.core import Gateway, GatewayConfig
    from serve.gateway.engines import EnginePool
    from serve.gateway.scheduler import ScheduleConfig, Scheduler
    from serve.processes import serve_in_thread

    with pytest.MonkeyPatch.context() as env:
        for name, value in environment(root, tiny_model_dir).items():
            env.setenv(name, value)
        make_personas(root, tiny_model_dir)
        engine_url, engine = serve_in_thread(create_app(EmbeddedEngine(str(tiny_model_dir), served_name="base",
                                                                       max_model_len=256)))
        store = Store.open(root / "home" / "feedback.duckdb")
        gateway = Gateway(load_catalog, EnginePool([engine_url]), store,
                          GatewayConfig(api_keys=KEYS, admin_keys=(ADMIN_KEY,), vote_quota_minute=0,
                                        vote_quota_day=0), registry=registry_actions())
        # Retraining off; its tick still decides experiments whose time is up.
        gateway.scheduler = Scheduler(gateway, ScheduleConfig(enabled=False, check_every=0.3))
        url, server = serve_in_thread(create_gateway_app(gateway, ui=False))
        gateway.url = url
        try:
            yield gateway
        finally:
            server.should_exit = True
            engine.should_exit = True
            time.sleep(0.5)  # the gateway's shutdown stops its tasks before the store closes
            store.close()


def admin(s, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, s.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120, **kw)


def start(s, persona: str, **rules) -> dict:
    r = admin(s, "POST", "/admin/experiments", json={"persona": persona, "challenger": 2, **rules})
    assert r.status_code == 200, r.text
    return r.json()


def experiment(s, experiment_id: str) -> dict:
    rows = admin(s, "GET", "/admin/experiments").json()["experiments"]
    return next(row for row in rows if row["id"] == experiment_id)


def ask(s, key: str, model: str, content: str = "go"):
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=2, temperature=0)


def duels(s, persona: str, key: str, i: int, choices: list[str]) -> None:
    """v1 answers a message for ``key`` once and v2 once per choice; ``key`` posts each choice
    ("v1", "v2" or "tie") on v1's answer against one of v2's (each pair is its own verdict)."""
    one = ask(s, key, f"{persona}@v1", f"question {i}")
    for j, choice in enumerate(choices):
        two = ask(s, key, f"{persona}@v2", f"question {i}")
        turns = (one.id, two.id) if j % 2 else (two.id, one.id)  # v1 on either side of the pair
        verdict = "tie" if choice == "tie" else "ab"[turns.index(one.id if choice == "v1" else two.id)]
        r = httpx.post(s.url + "/v1/comparisons", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"turn_a": turns[0], "turn_b": turns[1], "choice": verdict, "left": "ab"[i % 2]})
        assert r.status_code == 200, r.text


def vote_until_decided(s, persona: str, choices: list[str], experiment_id: str) -> dict:
    """Three voters post ``choices`` three at a time until the experiment is decided."""
    for i in range(0, len(choices), 3):
        if persona not in s.experiments.running:
            break
        try:
            duels(s, persona, KEYS[i % 3], i, choices[i:i + 3])
        except openai.NotFoundError:  # decided meanwhile: a retired challenger is not served
            break
    return wait_for(lambda: experiment(s, experiment_id), lambda row: row["status"] != "running")


def wait_for(read, done, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def in_share(experiment: dict) -> list[str]:
    """The keys whose clients the challenger serves, by the gateway's rule."""
    from serve.gateway.experiments import bucket

    return [k for k in KEYS if bucket(auth.fingerprint(k), experiment["id"]) < experiment["share"]]


def test_a_challenger_gets_the_side_by_side_rounds_and_a_sticky_share_of_clients(s):
    from serve.ui.chat import contenders
    from train import registry

    assert contenders(s, "share")[:2] == ("share", "share")
    exp = start(s, "share", share=0.5)
    assert (exp["status"], exp["challenger"], exp["active"], exp["share"]) == ("running", 2, 1, 0.5)
    assert contenders(s, "share") == ("share@v1", "share@v2", "active vs challenger (A/B experiment)")
    engine = httpx.get(s.pool.replicas[0].url + "/v1/models").json()["data"]
    assert "share-v2" in {m["id"] for m in engine}, "the challenger is loaded when its experiment starts"
    chosen = in_share(exp)
    assert 0 < len(chosen) < len(KEYS)
    for key in KEYS:
        assert ask(s, key, "share", f"hello {key}").model == ("share@v2" if key in chosen else "share@v1"), key
    others = [k for k in KEYS if k not in chosen]
    for key in (chosen[0], others[0]):  # the same client keeps its version
        assert {ask(s, key, "share", f"again {i}").model for i in range(3)} == {ask(s, key, "share").model}
    assert ask(s, chosen[0], "share@v1").model == "share@v1", "a pinned version is served as asked"
    assert registry.status("share", 2)[0] == "candidate"


def test_verdicts_for_the_challenger_promote_it_with_the_figures_recorded(s):
    from train import registry

    run = {"id": "run-win", "persona": "win", "kind": "dpo", "status": "challenger", "parent_version": 1,
           "adapter_version": 2, "started_at": "2026-01-01 00:00:00", "train_examples": 40}
    assert admin(s, "POST", "/admin/runs", json=run).status_code == 200
    from train.loop import GatewayClient

    # As the loop starts one for a gate-passing candidate (train/loop.py).
    exp = GatewayClient(s.url).start_experiment("win", 2, "run-win", {"share": 0.5, "min_votes": 10, "alpha": 0.05,
                                                                     "max_hours": 72})
    lucky = in_share(exp)[0]
    thumbed = ask(s, lucky, "win", "rate me")
    assert thumbed.model == "win@v2"
    r = httpx.post(s.url + "/v1/feedback", headers={"Authorization": f"Bearer {lucky}"},
                   json={"turn_id": thumbed.id, "vote": "up"})
    assert r.status_code == 200, r.text
    choices = ["tie" if i % 7 == 6 else "v2" for i in range(60)]  # 1 in 7 a tie
    done = vote_until_decided(s, "win", choices, exp["id"])
    assert done["status"] == "promoted", done
    figures = done["figures"]
    assert figures["decision"] == "promote" and figures["votes"] >= 10 and figures["low"] > 0.5
    assert figures["wins"] == figures["votes"] and figures["ties"] >= 1
    assert "length_controlled" in figures and figures["boot_low"] is not None
    assert figures["thumbs"]["challenger"] == {"up": 1, "down": 0}
    assert "promote" in done["reason"] and done["decided_at"]
    assert registry.active("win").version == 2 and registry.candidate("win") is None
    assert {ask(s, key, "win").model for key in KEYS[:6]} == {"win@v2"}, "every client gets v2 now"
    runs = admin(s, "GET", "/admin/runs", params={"persona": "win"}).json()["runs"]
    recorded = next(r for r in runs if r["id"] == "run-win")
    assert recorded["status"] == "promoted" and "A/B experiment" in recorded["message"]
    assert recorded["train_examples"] == 40, "the rest of the run's record stays"


def test_a_losing_challenger_is_retired_and_never_served_again(s):
    from serve.ui.chat import contenders
    from train import registry

    exp = start(s, "lose", share=0.5, min_votes=10)
    done = vote_until_decided(s, "lose", ["v1"] * 60, exp["id"])
    assert done["status"] == "retired" and done["figures"]["high"] < 0.5, done
    assert registry.active("lose").version == 1 and registry.status("lose", 2)[0] == "retired"
    with pytest.raises(openai.NotFoundError, match="lose v2 was retired"):
        ask(s, KEYS[0], "lose@v2")
    assert {ask(s, key, "lose").model for key in in_share(exp)} == {"lose@v1"}, "its share is served v1 again"
    assert contenders(s, "lose")[:2] == ("lose", "lose")
    again = admin(s, "POST", "/admin/experiments", json={"persona": "lose", "challenger": 2})
    assert again.status_code == 409 and again.json()["error"]["param"] == "challenger"


def test_an_experiment_past_its_time_limit_is_retired_on_the_scheduler_tick(s):
    exp = start(s, "late", max_hours=1 / 3600)  # one second
    time.sleep(1.2)
    done = wait_for(lambda: experiment(s, exp["id"]), lambda row: row["status"] != "running", timeout=10)
    assert done["status"] == "retired" and "time limit" in done["reason"], done
    with pytest.raises(openai.NotFoundError):
        ask(s, KEYS[0], "late@v2")


def test_a_version_made_active_by_hand_ends_the_experiment(s):
    from train import registry

    exp = start(s, "hand")
    registry.set_active("hand", 2, reason="manual promote")  # what `persona adapters promote` does
    assert admin(s, "POST", "/admin/reload").status_code == 200
    done = wait_for(lambda: experiment(s, exp["id"]), lambda row: row["status"] != "running", timeout=10)
    assert done["status"] == "stopped" and "made active by hand" in done["reason"], done
    assert registry.status("hand", 2)[0] == "active", "the operator's decision stands"


def test_cli_lists_and_stops_experiments_and_says_what_is_wrong(s, capsys, monkeypatch):
    from serve.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    exp = start(s, "cli", share=0.2)
    assert main(["experiments", "list", "--persona", "cli", "--gateway", s.url]) == 0
    listed = capsys.readouterr().out
    assert exp["id"] in listed and "v2 vs v1" in listed and "running" in listed
    assert main(["experiments", "stop", "exp-nope", "--gateway", s.url]) == 2
    said = capsys.readouterr().err
    assert "No experiment 'exp-nope'" in said and "Traceback" not in said
    assert main(["experiments", "stop", exp["id"], "--gateway", s.url]) == 0
    assert "is retired" in capsys.readouterr().out
    assert experiment(s, exp["id"])["status"] == "stopped"
    with pytest.raises(openai.NotFoundError):
        ask(s, KEYS[0], "cli@v2")
    assert main(["experiments", "stop", exp["id"], "--gateway", s.url]) == 2
    assert "is stopped already" in capsys.readouterr().err
    from serve.ui.app import experiment_table

    panel = experiment_table(s.experiments.recent("cli")).to_dict("records")
    assert panel[0]["id"] == exp["id"] and panel[0]["status"] == "stopped" and panel[0]["versions"] == "v2 vs v1"


def test_cli_without_a_gateway_reads_the_store_file(tmp_path, capsys):
    from feedback import experiments
    from feedback.store import Store
    from serve.cli import main

    path = tmp_path / "f.duckdb"
    store = Store.open(path)
    exp = experiments.start(store, "twice", 2, 1, None, 0.1, 40, 0.05, 72)
    store.close()
    nowhere = "http://127.0.0.1:9"
    assert main(["experiments", "list", "--gateway", nowhere, "--database", str(path)]) == 0
    assert exp["id"] in capsys.readouterr().out
    assert main(["experiments", "stop", "exp-nope", "--gateway", nowhere, "--database", str(path)]) == 2
    assert "No experiment 'exp-nope'" in capsys.readouterr().err


def test_a_second_experiment_of_a_persona_is_409_and_bad_rules_are_400(s):
    exp = start(s, "twice")
    again = admin(s, "POST", "/admin/experiments", json={"persona": "twice", "challenger": 2})
    assert again.status_code == 409 and exp["id"] in again.json()["error"]["message"]
    for body, param in (({"persona": "twice", "challenger": 2, "share": 1.5}, "share"),
                        ({"persona": "twice", "challenger": 2, "min_vote": 3}, "min_vote"),
                        ({"persona": "nobody", "challenger": 2}, "persona"),
                        ({"persona": "spare", "challenger": 1}, "challenger"),
                        ({"persona": "spare", "challenger": 9}, "challenger")):
        r = admin(s, "POST", "/admin/experiments", json=body)
        assert r.status_code in (400, 404, 409) and r.json()["error"]["param"] == param, (body, r.text)
    assert admin(s, "POST", "/admin/experiments/exp-nope/stop").status_code == 404
    r = httpx.post(s.url + "/admin/experiments", headers={"Authorization": f"Bearer {KEYS[0]}"},
                   json={"persona": "twice", "challenger": 2})
    assert r.status_code == 403, "an API key does not start experiments"


def test_a_retrain_asked_with_a_promotion_passes_it_to_the_run_process(tmp_path, monkeypatch):
    """``POST /admin/retrain {"promotion": "ab"}`` reaches ``persona retrain --promotion ab``."""
    import asyncio
    from types import SimpleNamespace

    from serve.cli import build_parser
    from serve.gateway import scheduler as scheduling
    from serve.gateway.scheduler import ScheduleConfig, Scheduler

    started = []

    class Process:
        def __init__(self, command, **kw):
            started.append(command)

        def poll(self):
            return 0

    monkeypatch.setattr(scheduling.subprocess, "Popen", Process)
    gateway = SimpleNamespace(snapshot=lambda: str(tmp_path), catalog=SimpleNamespace(personas={"teto": None}))
    scheduler = Scheduler(gateway, ScheduleConfig(log_dir=tmp_path))

    async def run():
        scheduler.launch("teto", promotion="ab")
        await scheduler.running["teto"]

    asyncio.run(run())
    command = started[0]
    assert command[command.index("--promotion") + 1] == "ab"
    assert build_parser().parse_args(command[3:]).promotion == "ab", "the retrain parser takes what it is given"
