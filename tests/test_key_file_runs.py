"""Key files everywhere: with the keys only in PERSONA_API_KEY_FILE and PERSONA_ADMIN_KEY_FILE,
a retrain asked for from the CLI runs in the gateway's scheduler, reaches the gateway at the
address it is bound to (a loopback address other than 127.0.0.1), records itself and is
seen by the CLI; and a run that fails before it records itself is recorded as failed, with
why. A real `persona up` on the tiny model, a real DuckDB file."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import httpx

from conftest import stop_process_group
from test_cli import persona
from test_faults import home
from test_loop import tiny_home  # noqa: F401 - the fixture: persona 'tiny' with an active v1

HOST = "127.0.0.2"  # loopback, but not 127.0.0.1: a gateway bound here does not answer there


def seed_comparisons(n: int = 40) -> None:
    """``n`` side-by-side verdicts for the short answer, in the store before the gateway opens it."""
    from feedback.store import Store, Turn
    from feedback.votes import record_comparison

    store = Store.open(home() / "feedback.duckdb")
    try:
        for i in range(n):
            for side, answer in (("a", "Do it now."), ("b", "Well, there is a lot one could say about it first.")):
                store.add_turn(Turn(id=f"t{i}{side}", requested_model="tiny",
                                    messages=[{"role": "system", "content": "Be short."},
                                              {"role": "user", "content": f"question {i}?"}],
                                    answers=[answer], finish_reasons=["stop"], sampling={}, stream=False,
                                    latency_ms=1, client="c", persona="tiny", adapter="tiny-v1", adapter_version=1))
            record_comparison(store, f"t{i}a", f"t{i}b", "a", "a", "c")
    finally:
        store.close()


@contextlib.contextmanager
def gateway_on(host: str, env: dict, log, *extra: str):
    from serve.processes import free_port, wait_for

    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "up", "--host", host, "--port", str(port), *extra],
                                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://{host}:{port}"
    try:
        wait_for(url, proc, 300, log)
        yield url
    finally:
        stop_process_group(proc)


def test_a_retrain_works_with_key_files_only(tiny_home, tmp_path):
    api_file, admin_file = tmp_path / "api-keys", tmp_path / "admin-keys"
    api_file.write_text("api-from-file\n")
    admin_file.write_text("# operators\nadmin-from-file\n")
    env = {**tiny_home, "PERSONA_API_KEY": "", "PERSONA_ADMIN_KEY": "", "PERSONA_API_KEY_FILE": str(api_file),
           "PERSONA_ADMIN_KEY_FILE": str(admin_file)}
    recipe = tmp_path / "quick.yaml"
    # One voter made the pairs; a small run (no reward model, no anchor, short sanity answers):
    # the run process is niced, on a machine that may be busy.
    recipe.write_text("epochs: 1\nmin_voters: 1\npromotion: gate\nreward_model: none\npersona_anchor: 0\n"
                      "rpo_alpha: 0\nmax_new_pairs: 12\nsanity_max_tokens: 8\n")
    seed_comparisons(12)
    with gateway_on(HOST, env, tmp_path / "up.log", "--retrain-recipe", str(recipe)) as url:
        assert httpx.post(url + "/admin/snapshot").status_code == 401  # keys are required here
        done = persona("retrain", "--persona", "tiny", "--gateway", url, "--wait", "--timeout", "600",
                       env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        admin = {"Authorization": "Bearer admin-from-file"}
        run = httpx.get(url + "/admin/runs", params={"persona": "tiny"}, headers=admin).json()["runs"][0]
        # It trained, and recorded its start and its end through the admin API, with the file's key.
        assert run["status"] in ("promoted", "rejected") and run["train_examples"] > 0, run
        assert run["finished_at"] is not None

        recipe.unlink()  # the next run process fails before it records anything
        for _ in range(60):  # the first run's process may still be exiting after its record (409 meanwhile)
            failed = persona("retrain", "--persona", "tiny", "--gateway", url, "--wait", "--timeout", "120",
                             env=env, timeout=300)
            if "already running" not in failed.stderr:
                break
            time.sleep(1)
        assert failed.returncode == 1, failed.stderr[-3000:]
        run = httpx.get(url + "/admin/runs", params={"persona": "tiny"}, headers=admin).json()["runs"][0]
        assert run["status"] == "failed", run
        assert "exited with code 2 before it recorded the run" in run["message"]
        assert "quick.yaml" in run["message"], run["message"]           # the run's own one-line error
    assert "exited with code 2" in (tmp_path / "up.log").read_text()     # and the gateway's log says so


def test_commands_take_keys_from_the_key_files(tmp_path, monkeypatch):
    from feedback import keys
    from train import simulate
    from train.loop import bearer

    admin_file, api_file = tmp_path / "admin-keys", tmp_path / "api-keys"
    admin_file.write_text("# operators\n\nadmin-1  # alice\nadmin-2\n")
    api_file.write_text("api-1\napi-2\napi-3\n")
    monkeypatch.delenv("PERSONA_ADMIN_KEY", raising=False)
    monkeypatch.delenv("PERSONA_API_KEY", raising=False)
    assert bearer("PERSONA_ADMIN_KEY") == {}
    monkeypatch.setenv("PERSONA_ADMIN_KEY_FILE", str(admin_file))
    monkeypatch.setenv("PERSONA_API_KEY_FILE", str(api_file))
    assert bearer("PERSONA_ADMIN_KEY") == {"Authorization": "Bearer admin-1"}
    monkeypatch.setenv("PERSONA_ADMIN_KEY", "from-env")                  # the variable comes first
    assert keys.configured_keys("ADMIN") == ("from-env", "admin-1", "admin-2")
    assert bearer("PERSONA_ADMIN_KEY") == {"Authorization": "Bearer from-env"}
    assert [[h["Authorization"] for h in r] for r in simulate.rater_keys(2)] == [["Bearer api-1", "Bearer api-3"],
                                                                                ["Bearer api-2"]]
    admin_file.unlink()                                                   # a missing file gives no key
    monkeypatch.delenv("PERSONA_ADMIN_KEY")
    assert keys.client_key("ADMIN") is None


def test_runs_reach_the_gateway_at_its_bound_address():
    from serve.processes import url_of

    assert url_of("0.0.0.0", 7860) == "http://127.0.0.1:7860"
    assert url_of("::", 7860) == "http://[::1]:7860"
    assert url_of("127.0.0.2", 80) == "http://127.0.0.2:80"
    assert url_of("10.1.2.3", 7860) == "http://10.1.2.3:7860"
    assert url_of("[fe80::1]", 7860) == "http://[fe80::1]:7860"
    assert url_of("gw.internal", 7860) == "http://gw.internal:7860"
