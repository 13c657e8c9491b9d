"""The `persona` command as a user runs it: real subprocesses, one-line errors."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import write_jsonl


def persona(*args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "serve.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("persona: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_persona():
    assert_one_line_error(persona("train", "sft", "--persona", "nobody"), "unknown persona 'nobody'", "teto")


def test_bad_dataset_record_names_file_line_field(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "hi", "response": "yo"}, {"prompt": "hi"}])
    assert_one_line_error(persona("data", "check", str(path)), f"{path}:2: field 'response': missing")


def test_shipped_data_checks_clean():
    from train.personas import list_personas

    files = sum(len(p.data.train) + len(p.data.heldout) + len(p.data.safety) for p in list_personas())
    result = persona("data", "check")
    assert result.returncode == 0, result.stderr
    assert f"records in {files} files are valid" in result.stdout


def test_unknown_recipe_key(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("epochs: 1\nbatchsize: 4\n")
    assert_one_line_error(persona("train", "sft", "--persona", "teto", "--recipe", str(recipe)),
                          "unknown key 'batchsize'")


def test_rollback_without_history_and_bad_version():
    assert_one_line_error(persona("adapters", "rollback", "--persona", "teto"), "no active adapter")
    result = persona("adapters", "promote", "--persona", "teto", "--version", "seven")
    assert result.returncode == 2 and "expected a version like 3 or v3" in result.stderr


def test_chat_before_training_says_what_to_run():
    assert_one_line_error(persona("chat", "--persona", "egen", "hello"), "persona train sft --persona egen")


def test_invalid_setting_is_named(monkeypatch):
    monkeypatch.setenv("PERSONA_HOME", "")
    monkeypatch.setenv("PERSONA_LOG_LEVEL", "LOUD")
    assert_one_line_error(persona("settings"), "PERSONA_LOG_LEVEL='LOUD' is invalid", "expected DEBUG")


def test_train_list_chat_end_to_end(tmp_path, tiny_model_dir):
    """train sft -> adapters list -> chat, through the real command on a tiny model."""
    personas = tmp_path / "personas"
    write_jsonl(personas / "data" / "train.jsonl", [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "Do it now."}]}
        for i in range(8)
    ])
    (personas / "tiny.yaml").write_text(
        "name: tiny\ndisplay_name: Tiny\ndescription: test\nsystem_prompt: Be short.\nlanguages: [en]\n"
        "data:\n  train: [{path: data/train.jsonl, language: en}]\n")
    env = {"PERSONA_PERSONAS_DIR": str(personas), "PERSONA_BASE_MODEL": str(tiny_model_dir)}
    trained = persona("train", "sft", "--persona", "tiny", "--max-steps", "2", env=env)
    assert trained.returncode == 0, trained.stderr
    assert "Saved tiny-v1" in trained.stderr and "Training took" in trained.stderr
    listed = persona("adapters", "list", env=env)
    assert "v1" in listed.stdout and "active" in listed.stdout
    chat = persona("chat", "--persona", "tiny", "--max-tokens", "5", "hello", env=env)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.startswith("Tiny:") and "tiny-v1" in chat.stderr

    # `persona up`: engine + gateway; a chat through the official client lands in the store.
    import openai

    from feedback.store import Store
    from serve.processes import free_port, persona_process

    port = free_port()
    with persona_process(["up", "--port", str(port)], port, tmp_path / "up.log", env=env) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "tiny@v1"]
        reply = client.chat.completions.create(model="tiny", max_tokens=4,
                                               messages=[{"role": "user", "content": "hello"}])
        assert reply.model == "tiny@v1"
        import httpx

        assert httpx.post(url + "/v1/feedback", json={"turn_id": reply.id, "vote": "up"}).status_code == 200
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "gradio" in page.text.lower()  # the browser UI is mounted at /
        # While the gateway holds the store, the feedback commands read a snapshot it exports.
        stats = persona("feedback", "stats", "--json", "--gateway", url, env=env)
        assert stats.returncode == 0, stats.stderr
        figures = json.loads(stats.stdout)
        assert figures["totals"]["votes"] == 1 and figures["thumbs"][0]["up"] == 1
        assert [(a["persona"], a["status"]) for a in figures["adapters"]] == [("tiny", "active")]
        assert "snapshot" in stats.stderr
        exported = persona("feedback", "export", "--format", "sft", "--persona", "tiny", "--gateway", url,
                           "--out", str(tmp_path / "sft.jsonl"), env=env)
        assert exported.returncode == 0, exported.stderr
        record = json.loads((tmp_path / "sft.jsonl").read_text().splitlines()[0])
        assert record["messages"][-1] == {"role": "assistant", "content": reply.choices[0].message.content}
    log = (tmp_path / "up.log").read_text()
    assert "serves loopback clients only" in log and "gateway ready: tiny@v1" in log
    engine_port = int(log.split("embedded engine starting on 127.0.0.1:")[1].split()[0])
    import httpx

    for _ in range(100):  # the engine `persona up` started stops with it
        try:
            httpx.get(f"http://127.0.0.1:{engine_port}/health", timeout=1)
        except httpx.ConnectError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the engine on port {engine_port} outlived `persona up`")
    store = Store.open()  # the gateway has exited, so the file is free
    turn = store.turn(reply.id)
    assert (turn.persona, turn.adapter_version, turn.messages[0]["content"]) == ("tiny", 1, "Be short.")
    store.close()


def test_bench_sft_prints_every_configuration_side_by_side(tiny_model_dir):
    from bench.sft_speed import configurations
    from train.recipes import load_recipe

    result = persona("bench", "sft", "--steps", "1", "--base-model", str(tiny_model_dir))
    assert result.returncode == 0, result.stderr
    labels = [label for label, _, _ in configurations(load_recipe("sft"))]
    assert len(labels) == 6
    for label in labels:
        assert f" {label} " in result.stdout
    assert "speed vs ours" in result.stdout and "1.00x" in result.stdout
    assert f"with {tiny_model_dir.name} (en data)" in " ".join(result.stdout.split())   # the model it ran


@pytest.fixture
def teto_on_tiny_model(tiny_model_dir):
    """teto with an active (random) adapter on the tiny model, in this test's PERSONA_HOME."""
    from conftest import make_lora
    from train import registry

    staging = registry.staging_dir("teto")
    make_lora(tiny_model_dir, staging, seed=1)
    registry.set_active("teto", registry.commit("teto", staging, {"kind": "sft"}).version)


def test_bench_serve_compares_gateway_engine_and_naive_server(tiny_model_dir, teto_on_tiny_model):
    result = persona("bench", "serve", "--clients", "1,2", "--requests", "1", "--max-tokens", "4", "--no-vllm",
                     "--base-model", str(tiny_model_dir), env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 6, result.stdout
    for label in ("gateway -> embedded", "embedded engine", "naive"):
        assert sum(label in row for row in rows) == 2
    assert "teto-v1" in result.stdout and "1.00x" in result.stdout
    assert all("%" in row for row in rows if "gateway" in row), "the gateway's own CPU share is shown"
    assert f"Streaming chat on {tiny_model_dir.name}" in result.stdout and "base model: " in result.stdout


def test_bench_serve_refuses_adapters_of_another_base_model(tiny_model_dir, tmp_path):
    from conftest import make_lora
    from train import registry

    staging = registry.staging_dir("teto")
    make_lora(tiny_model_dir, staging, seed=1)
    registry.set_active("teto", registry.commit("teto", staging, {"kind": "sft", "base_model": "/elsewhere"}).version)
    result = persona("bench", "serve", "--no-vllm", "--base-model", str(tiny_model_dir))
    assert result.returncode == 2 and "teto-v1 were not trained on" in result.stderr, result.stderr[-2000:]


def test_bench_feedback_finds_every_acknowledged_vote(tiny_model_dir, teto_on_tiny_model):
    result = persona("bench", "feedback", "--votes", "60", "--clients", "4", "--build-votes", "2000",
                     env={"PERSONA_BASE_MODEL": str(tiny_model_dir), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    for row in rows[:2]:  # a transaction per vote, then group commit
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[1:5] == ["4", "60", "60", "60"], row
    assert "1.00x" in rows[0] and "group" in rows[1]
    assert "LOST" not in result.stdout
    build = rows[2:]
    assert [c.strip() for c in build[0].strip("│").split("│")][:3] == ["200", "180", "20"]
    assert [c.strip() for c in build[1].strip("│").split("│")][:3] == ["2,000", "1,800", "200"]


def test_bench_load_finds_every_acknowledged_vote_and_saves_its_figures(tiny_model_dir, teto_on_tiny_model,
                                                                        persona_home):
    result = persona("bench", "load", "--users", "4", "--seconds", "3", "--max-tokens", "4",
                     env={"PERSONA_BASE_MODEL": str(tiny_model_dir), "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    assert "LOST" not in result.stdout
    saved = json.loads(next((persona_home / "runs" / "bench").glob("load-*.json")).read_text())
    assert saved["users"] == 4 and saved["chats_ok"] >= 4 and saved["timeouts"] == 0
    assert saved["votes_found"] == saved["votes_acknowledged"] >= 1
    assert saved["comparisons_found"] == saved["comparisons_acknowledged"]
    assert not list((persona_home / "snapshots").glob("*")), "the scratch store's snapshot is removed"


def test_up_on_a_taken_port_says_so_before_starting_anything():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = persona("up", "--port", str(port))
    assert_one_line_error(result, f"127.0.0.1:{port}", "another `persona up`")
