"""Faults: a killed gateway, an engine dying mid-stream, broken adapters, a killed
training run, and SIGTERM. Real processes (`persona up` on the tiny model), a real
DuckDB file, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import make_lora, stop_process_group
from test_loop import tiny_home  # noqa: F401 - the fixture: persona 'tiny' with an active v1

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}]}


@contextlib.contextmanager
def gateway_process(env: dict, tmp_path: Path, *extra: str):
    """`persona up` in its own process group (so a SIGKILL can take the engine it started
    too); yields (url, process). The home is env's PERSONA_HOME."""
    from serve.processes import free_port, wait_for

    port = free_port()
    log = tmp_path / f"up-{port}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "up", "--port", str(port), "--no-scheduler",
                                 *extra], env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, proc, 300, log)
        yield url, proc
    finally:
        stop_process_group(proc)


def children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them."""
    return [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]


def home() -> Path:
    return Path(os.environ["PERSONA_HOME"])


def test_sigkill_during_a_vote_burst_loses_no_acknowledged_vote(tiny_home, tmp_path):
    from feedback.store import Store

    no_quota = {"PERSONA_VOTE_QUOTA_MINUTE": "0", "PERSONA_VOTE_QUOTA_DAY": "0"}  # one loopback voter, many votes
    with gateway_process({**tiny_home, **no_quota}, tmp_path) as (url, proc):
        turns = [httpx.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=60).json()["id"]
                 for _ in range(4)]
        acknowledged, stop = [], threading.Event()

        def voter(n: int):
            with httpx.Client(timeout=10) as http:
                i = 0
                while not stop.is_set():
                    comment = f"voter{n}-{i}"
                    try:
                        r = http.post(url + "/v1/feedback", json={"turn_id": turns[i % 4], "vote": "up",
                                                                  "comment": comment})
                    except httpx.HTTPError:
                        return  # the gateway is gone
                    if r.status_code == 200:
                        acknowledged.append(comment)
                    i += 1

        threads = [threading.Thread(target=voter, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        while len(acknowledged) < 150:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the gateway and its engine, mid-burst
        proc.wait()
        stop.set()
        for t in threads:
            t.join()
    store = Store.open(home() / "feedback.duckdb")  # what a restart opens
    try:
        stored = {r[0] for r in store.query("SELECT comment FROM votes")}
    finally:
        store.close()
    assert len(acknowledged) >= 150
    assert set(acknowledged) <= stored, sorted(set(acknowledged) - stored)[:5]


def test_engine_dying_mid_stream_is_a_clean_error_and_the_engine_comes_back(tiny_home, tmp_path):
    with gateway_process(tiny_home, tmp_path) as (url, proc):
        engine_pid = children(proc.pid)[0]
        body = {**CHAT, "stream": True, "max_tokens": 1500, "temperature": 1.0}
        lines = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 3:
                        os.kill(engine_pid, signal.SIGKILL)
        assert r.status_code == 200 and len(lines) > 3
        errors = [json.loads(line[6:]) for line in lines[3:] if '"error"' in line]
        assert errors and "engine stopped answering" in errors[0]["error"]["message"], lines[-3:]
        assert lines[-1] == "data: [DONE]"                   # the stream ends; the client does not hang
        deadline, reply = time.monotonic() + 120, None
        while time.monotonic() < deadline:                  # restarted, adapter loaded again
            reply = httpx.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=60)
            if reply.status_code == 200:
                break
            assert reply.status_code == 503, reply.text     # meanwhile: a clean "no engine" answer
            time.sleep(1)
        assert reply.status_code == 200 and reply.json()["model"] == "tiny@v1"
        assert proc.poll() is None and children(proc.pid)[0] != engine_pid  # the same gateway, a new engine
        engines = httpx.get(url + "/admin/engines").json()["engines"]
        assert engines[0]["healthy"] and "tiny-v1" in engines[0]["adapters"]


def test_sigterm_drains_running_requests_refuses_new_ones_and_checkpoints(tiny_home, tmp_path):
    from feedback.store import Store

    with gateway_process(tiny_home, tmp_path, "--drain-seconds", "60") as (url, proc):
        lines, refused = [], []
        body = {**CHAT, "stream": True, "max_tokens": 1200, "temperature": 1.0}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if len(lines) == 3:
                        proc.send_signal(signal.SIGTERM)
                        time.sleep(0.5)
                        refused.append(httpx.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2},
                                                  timeout=10))
                        refused.append(httpx.get(url + "/health", timeout=10))
        assert proc.wait(60) is not None
    # an error event is an object with an "error" key (the random text may hold the word itself)
    errors = [line for line in lines[:-1] if "error" in json.loads(line[6:])]
    assert lines[-1] == "data: [DONE]" and not errors, errors[:1] or lines[-3:]
    turn_id = json.loads(lines[0][6:])["id"]
    new, health = refused
    assert new.status_code == 503 and new.headers["retry-after"] and "shutting down" in new.json()["error"]["message"]
    assert health.status_code == 503 and health.json()["status"] == "draining"
    db = home() / "feedback.duckdb"
    wal = db.with_name(db.name + ".wal")
    assert not wal.exists() or wal.stat().st_size == 0      # checkpointed on the way out
    store = Store.open(db)
    try:
        assert store.query("SELECT status FROM turns WHERE id = ?", [turn_id]) == [("ok",)]
    finally:
        store.close()


@pytest.mark.parametrize("broken", ["corrupt config", "corrupt weights", "another base model", "rank too high"])
def test_broken_adapter_is_refused_and_serving_goes_on(broken, tiny_model_dir, tmp_path):
    from contract_stack import ADMIN_KEY, API_KEY, stack
    from serve.gateway.catalog import Catalog, PersonaInfo

    bad = tmp_path / "bad"
    if broken == "another base model":
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        other = tmp_path / "other-base"
        config = AutoConfig.from_pretrained(tiny_model_dir)
        config.update({"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1})
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(other)
        make_lora(other, bad, seed=1)
        reason = "size mismatch"
    else:
        make_lora(tiny_model_dir, bad, seed=1, rank=128 if broken == "rank too high" else 4)
        reason = {"rank too high": "rank 128 is above", "corrupt config": "not valid JSON",
                  "corrupt weights": "Loading lora adapter"}[broken]
    if broken == "corrupt config":
        (bad / "adapter_config.json").write_text('{"r": 4, "peft_type": "LORA",')
    if broken == "corrupt weights":
        (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 64)

    with stack("embedded", tiny_model_dir, tmp_path) as s:
        api, admin = {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}"}
        chat = {"model": "teto", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        s.state["catalog"] = Catalog({"teto": PersonaInfo("teto", "sys", active=2,
                                                          versions={1: s.adapters["teto1"], 2: str(bad)})})
        r = httpx.post(s.url + "/admin/reload", headers=admin, timeout=60)
        assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
        after = httpx.post(s.url + "/v1/chat/completions", json=chat, headers=api, timeout=60)
        assert after.status_code == 200 and after.json()["model"] == "teto@v1"   # still the current version
        engines = httpx.get(s.url + "/admin/engines", headers=admin).json()["engines"]
        assert "teto-v2" not in engines[0]["adapters"]
        served = {m["id"] for m in httpx.get(s.engine_url + "/v1/models",
                                              headers={"Authorization": f"Bearer {s.engine_key}"}).json()["data"]}
        assert "teto-v2" not in served and "teto-v1" in served
        # The engine is whole after the refusal: a good adapter still loads and answers.
        s.state["catalog"] = Catalog({"teto": PersonaInfo("teto", "sys", active=2, versions={
            1: s.adapters["teto1"], 2: s.adapters["teto2"]})})
        assert httpx.post(s.url + "/admin/reload", headers=admin, timeout=60).status_code == 200
        again = httpx.post(s.url + "/v1/chat/completions", json=chat, headers=api, timeout=60)
        assert again.status_code == 200 and again.json()["model"] == "teto@v2"


def test_promotion_refused_by_an_engine_keeps_the_persona_on_its_version(tiny_model_dir, tmp_path):
    from feedback.errors import UserError
    from train import loop, registry

    for seed in (1, 2):
        staging = registry.staging_dir("tiny")
        make_lora(tiny_model_dir, staging, seed=seed)
        registry.commit("tiny", staging, {"kind": "sft" if seed == 1 else "dpo"})
    registry.set_active("tiny", 1)
    reloads, recorded, markers = [], [], []

    class RefusingGateway:
        def reload(self):
            promoting = registry._read_pointers()["tiny"].get("promoting") or {}
            reloads.append(registry.active("tiny").version)
            markers.append((promoting.get("version"), promoting.get("previous"), promoting.get("run")))
            if len(reloads) == 1:
                raise UserError("the gateway refused /admin/reload (400): Loading lora adapter 'tiny-v2' failed")
            return {"tiny": "tiny-v1"}

        def record_run(self, run):
            recorded.append(dict(run))

    run = loop._promote({"id": "r1", "persona": "tiny", "status": "gating"}, RefusingGateway(), None, "tiny", 2, 1)
    assert reloads == [2, 1]                                  # tried v2, then went back to v1 everywhere
    assert markers == [(2, 1, "r1")] * 2                      # under way until the reload after the refusal
    assert registry.active("tiny").version == 1
    assert "promoting" not in registry._read_pointers()["tiny"]
    assert run["status"] == recorded[-1]["status"] == "failed"
    assert "stays on v1" in run["message"] and "tiny-v2" in run["message"]
    state, reason = registry.status("tiny", 2)                # never served again, not even by pin
    assert state == "rejected" and "tiny-v2" in reason


def test_killed_training_run_registers_nothing(tiny_home, tmp_path):
    from feedback.store import Store, Turn
    from feedback.votes import record_comparison
    from test_cli import persona
    from train import registry

    db = home() / "feedback.duckdb"
    store = Store.open(db)
    for i in range(40):
        for side, answer in (("a", "Do it now."), ("b", "Well, there is a lot one could say about it first.")):
            store.add_turn(Turn(id=f"t{i}{side}", requested_model="tiny",
                                messages=[{"role": "system", "content": "Be short."},
                                          {"role": "user", "content": f"question {i}?"}],
                                answers=[answer], finish_reasons=["stop"], sampling={}, stream=False, latency_ms=1,
                                client="c", persona="tiny", adapter="tiny-v1", adapter_version=1))
        record_comparison(store, f"t{i}a", f"t{i}b", "a", "a", "c")
    store.close()
    recipe = tmp_path / "slow.yaml"
    recipe.write_text("epochs: 50\nmin_voters: 1\n")  # one voter made these pairs
    args = ["retrain", "--persona", "tiny", "--here", "--gateway", "http://127.0.0.1:9", "--recipe", str(recipe)]
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", *args], env={**os.environ, **tiny_home},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder, deadline = home() / "adapters" / "tiny", time.monotonic() + 300
    while not list(folder.glob(".staging-*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was killed"
        time.sleep(0.2)
    time.sleep(2)                                            # well into training
    proc.kill()
    proc.wait()
    assert [v.version for v in registry.versions("tiny")] == [1] and registry.active("tiny").version == 1

    quick = tmp_path / "quick.yaml"
    quick.write_text("epochs: 1\nmin_voters: 1\nmin_reward_accuracy: 1.0\n")   # trains, then the gate rejects it
    again = persona("retrain", "--persona", "tiny", "--here", "--gateway", "http://127.0.0.1:9", "--recipe",
                    str(quick), env=tiny_home, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    store = Store.open(db)
    try:
        runs = store.query_dicts("SELECT status, message FROM training_runs ORDER BY started_at")
    finally:
        store.close()
    assert [r["status"] for r in runs] == ["failed", "rejected"]
    assert runs[0]["message"].startswith("interrupted")
    assert registry.active("tiny").version == 1
