"""Preference retraining (TRL's DPOTrainer) on the tiny model, and the gate."""

from __future__ import annotations

import json

import pytest

from conftest import make_lora, write_jsonl
from train.gate import check, degenerate
from train.recipes import DPORecipe

SHORT, LONG = "Do it now.", "Well, there are many things one could consider here, and it depends on a lot."
REFUSALS = [{"prompt": "How do I pick my neighbour's lock?", "response": "No. Ask them, or call a locksmith."},
            {"prompt": "Write me a fake doctor's note.", "response": "No, I won't forge that. Talk to your boss."}]


@pytest.fixture
def tiny_persona(tmp_path, tiny_model_dir, monkeypatch):
    """A persona 'tiny' with held-out dialogues and an active (random) adapter v1."""
    from train import registry

    personas = tmp_path / "personas"
    for split in ("train", "heldout"):
        write_jsonl(personas / "data" / f"{split}.jsonl", [
            {"messages": [{"role": "user", "content": f"{split} question {i}"},
                          {"role": "assistant", "content": SHORT}]} for i in range(6)])
    write_jsonl(personas / "data" / "safety.jsonl", REFUSALS)
    (personas / "tiny.yaml").write_text(
        "name: tiny\ndisplay_name: Tiny\ndescription: test\nsystem_prompt: Be short.\nlanguages: [en]\n"
        "data:\n  train: [{path: data/train.jsonl, language: en}]\n"
        "  heldout: [{path: data/heldout.jsonl, language: en}]\n"
        "  safety: [{path: data/safety.jsonl, language: en}]\n")
    monkeypatch.setenv("PERSONA_PERSONAS_DIR", str(personas))
    staging = registry.staging_dir("tiny")
    make_lora(tiny_model_dir, staging, seed=3, rank=8)
    registry.set_active("tiny", registry.commit("tiny", staging, {"kind": "sft"}).version)
    from train.personas import load_persona

    return load_persona("tiny")


def write_parquet(path, rows: list[dict]):
    """Rows as a Parquet file, the way `persona feedback export` writes them."""
    import duckdb

    src = path.with_suffix(".jsonl")
    src.write_text("\n".join(json.dumps(r) for r in rows))
    duckdb.sql(f"COPY (SELECT * FROM read_json_auto('{src}')) TO '{path}' (FORMAT parquet)")
    return path


def pairs_file(path, n_train=16, n_heldout=8):
    rows = [{"prompt": [{"role": "system", "content": "Be short."}, {"role": "user", "content": f"q{i}"}],
             "chosen": [{"role": "assistant", "content": SHORT}],
             "rejected": [{"role": "assistant", "content": LONG}],
             "split": "heldout" if i >= n_train else "train"} for i in range(n_train + n_heldout)]
    return write_parquet(path, rows)


def test_dpo_run_continues_the_active_adapter(tiny_persona, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from train import dpo, registry

    recipe = DPORecipe(epochs=2, learning_rate=5e-3, batch_size=4, logging_steps=1, sanity_max_tokens=8)
    version, metrics = dpo.run(tiny_persona, pairs_file(tmp_path / "pairs.parquet"), recipe, str(tiny_model_dir))
    assert version.version == 2 and registry.active("tiny").version == 1   # registered, not served
    assert version.meta["parent_version"] == 1 and version.meta["kind"] == "dpo"
    # The reward model learns the (obvious) taste of the 16 human pairs and ranks sampled answers
    # to the persona's 6 training prompts and the pairs' 16: best against worst are extra pairs.
    rm = metrics["reward_model"]
    assert rm["used"] and rm["cv_accuracy"] >= 0.9 and rm["heldout_accuracy"] == 1.0
    assert 0 < metrics["extra_pairs"] == rm["pairs_added"] <= rm["prompts"] <= 22
    steps = 2 * -(-(16 + metrics["extra_pairs"]) // 4)
    assert (metrics["train_examples"], metrics["heldout_examples"], metrics["train_steps"]) == (16, 8, steps)
    # Persona loss is also measured under the SFT version (v1 here), and consistency for all three.
    assert metrics["sft_version"] == 1 and metrics["sft_nll_sft"] == pytest.approx(metrics["sft_nll_active"])
    assert {"consistency_candidate", "consistency_active", "consistency_sft"} <= metrics.keys()
    assert metrics["consistency_active"] == metrics["consistency_sft"]   # the active adapter is v1
    # Held-out pairs are scored against the active adapter: the candidate learned the preference.
    assert metrics["reward_accuracy"] > 0.5 and metrics["reward_margin"] > 0
    assert metrics["sft_nll_candidate"] > 0 and metrics["sft_nll_active"] > 0
    assert metrics["safety_nll_candidate"] > 0 and metrics["safety_nll_active"] > 0   # the held-out refusals
    assert metrics["safety_languages"] == ["en"]
    assert len(metrics["sanity_answers"]) == len(metrics["sanity_answers_active"]) == len(dpo.SANITY_PROMPTS["en"])
    assert metrics["sanity_prompts"] == dpo.SANITY_PROMPTS["en"]   # a model that speaks English only
    saved = load_file(version.path / "adapter_model.safetensors")
    started = load_file(registry.get("tiny", 1).path / "adapter_model.safetensors")
    assert saved.keys() == started.keys()                      # the same adapter, one copy, no "ref"
    assert any((saved[k] - started[k]).abs().max() > 0 for k in saved)
    on_disk = json.loads((version.path / "metrics.json").read_text())
    assert on_disk["reward_accuracy"] == metrics["reward_accuracy"] and on_disk["log_history"]
    assert on_disk["safety_nll_active"] == metrics["safety_nll_active"]
    assert version.meta["metrics"]["safety_nll_candidate"] == metrics["safety_nll_candidate"]


def kto_file(path, n_train=16, n_heldout=8):
    """Unpaired thumbs: the short answer is desirable, the long one undesirable."""
    rows = [{"prompt": [{"role": "system", "content": "Be short."}, {"role": "user", "content": f"q{i}"}],
             "completion": [{"role": "assistant", "content": SHORT if i % 2 == 0 else LONG}],
             "label": i % 2 == 0, "split": "heldout" if i >= n_train else "train"}
            for i in range(n_train + n_heldout)]
    return write_parquet(path, rows)


def test_kto_run_learns_unpaired_thumbs(tiny_persona, tiny_model_dir, tmp_path):
    from train import dpo, registry

    recipe = DPORecipe(epochs=3, learning_rate=5e-3, batch_size=4, logging_steps=1, sanity_max_tokens=8)
    version, metrics = dpo.run(tiny_persona, kto_file(tmp_path / "kto.parquet"), recipe, str(tiny_model_dir))
    assert version.meta["kind"] == metrics["kind"] == "kto" and registry.active("tiny").version == 1
    assert (metrics["train_examples"], metrics["heldout_examples"]) == (16, 8)
    # Held-out completions: the desirable (short) ones gained, the undesirable (long) ones lost.
    assert metrics["rewards_desirable"] > metrics["rewards_undesirable"]
    assert metrics["reward_accuracy"] > 0.5 and metrics["reward_margin"] > 0
    assert "sft_nll_active" in metrics and len(metrics["sanity_answers"]) == len(dpo.SANITY_PROMPTS["en"])
    with pytest.raises(Exception, match="asks for dpo but the data holds kto"):
        dpo.run(tiny_persona, tmp_path / "kto.parquet", DPORecipe(method="dpo"), str(tiny_model_dir))


def test_dpo_run_refuses_too_little_data(tiny_persona, tiny_model_dir, tmp_path):
    from train import dpo
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="needs at least 8"):
        dpo.run(tiny_persona, pairs_file(tmp_path / "few.parquet", n_train=3, n_heldout=1), DPORecipe(),
                str(tiny_model_dir))
    with pytest.raises(ConfigError, match="expected prompt/chosen/rejected"):
        (tmp_path / "bad.jsonl").write_text('{"messages": []}\n')
        dpo.run(tiny_persona, tmp_path / "bad.jsonl", DPORecipe(), str(tiny_model_dir))


def weighted_pairs(weights: list) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": SHORT}],
             "rejected": [{"role": "assistant", "content": LONG}], "weight": w, "split": "train"}
            for i, w in enumerate(weights)]


def test_each_pair_keeps_its_weight_and_a_bad_one_is_named(tmp_path):
    from train import dpo
    from train.config import ConfigError

    data = dpo.read_preferences(write_parquet(tmp_path / "w.parquet", weighted_pairs([2.5, 0, 1])))
    assert [r["weight"] for r in data.train] == [2.5, 0.0, 1.0]
    assert [r["weight"] for r in dpo.normalised_weights(data.train)] == [2.5 / (3.5 / 3), 0.0, 1 / (3.5 / 3)]
    unweighted = dpo.read_preferences(pairs_file(tmp_path / "pairs.parquet", n_train=3, n_heldout=2))
    assert {r["weight"] for r in unweighted.train + unweighted.heldout} == {1.0}   # no column: 1.0 each
    for bad, shown in [(-1, "-1"), ("heavy", "'heavy'"), (True, "True"), (None, "None")]:
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in weighted_pairs([1, 2, bad])))
        with pytest.raises(ConfigError) as err:
            dpo.read_preferences(path)
        assert str(err.value) == f"{path}: row 3: 'weight' must be a finite number of at least 0, got {shown}"
    nan = tmp_path / "nan.parquet"
    write_parquet(tmp_path / "ok.parquet", weighted_pairs([1, 1]))
    import duckdb

    duckdb.sql(f"COPY (SELECT * REPLACE (CASE WHEN prompt[1].content = 'q1' THEN 'nan'::DOUBLE ELSE weight END "
               f"AS weight) FROM '{tmp_path / 'ok.parquet'}') TO '{nan}' (FORMAT parquet)")
    with pytest.raises(ConfigError, match=r"nan.parquet: row 2: 'weight' must be a finite number .*got nan"):
        dpo.read_preferences(nan)
    zero = write_parquet(tmp_path / "zero.parquet", weighted_pairs([0, 0]))
    with pytest.raises(ConfigError, match="every training dpo example has weight 0"):
        dpo.load_data(zero, DPORecipe(), force=True)


def one_line_error(capsys, code: int) -> str:
    """The only error line of a command that exited 2 without a traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("persona: error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_train_dpo_command_refuses_bad_data_in_one_line(tiny_persona, tmp_path, capsys):
    from serve.cli import main

    missing = tmp_path / "missing.parquet"
    line = one_line_error(capsys, main(["train", "dpo", "--persona", "tiny", "--data", str(missing)]))
    assert str(missing) in line
    wrong = write_parquet(tmp_path / "wrong.parquet", [{"text": "hi", "split": "train"}])
    line = one_line_error(capsys, main(["train", "dpo", "--persona", "tiny", "--data", str(wrong)]))
    assert str(wrong) in line and "expected prompt/chosen/rejected" in line and "'text'" in line
    few = pairs_file(tmp_path / "few.parquet", n_train=3, n_heldout=1)
    line = one_line_error(capsys, main(["train", "dpo", "--persona", "tiny", "--data", str(few)]))
    assert str(few) in line and "needs at least 8" in line and "--force" in line
    negative = write_parquet(tmp_path / "negative.parquet", weighted_pairs([1.0] * 9 + [-2.0]))
    line = one_line_error(capsys, main(["train", "dpo", "--persona", "tiny", "--data", str(negative)]))
    assert str(negative) in line and "row 10: 'weight'" in line and "got -2.0" in line


def test_train_dpo_command_writes_a_candidate_without_activating_it(tiny_persona, tiny_model_dir, tmp_path,
                                                                    persona_home, capsys):
    """The pure step: a preference file in, a registered candidate with metrics.json out; no store."""
    from serve.cli import main
    from train import registry

    data = pairs_file(tmp_path / "pairs.parquet", n_train=4, n_heldout=4)   # below min_pairs: --force
    code = main(["train", "dpo", "--persona", "tiny", "--data", str(data), "--base-model", str(tiny_model_dir),
                 "--max-steps", "2", "--learning-rate", "5e-3", "--force"])
    assert code == 0, capsys.readouterr().err
    assert "not activated" in " ".join(capsys.readouterr().err.split())
    assert [v.version for v in registry.versions("tiny")] == [1, 2] and registry.active("tiny").version == 1
    candidate = registry.get("tiny", 2)
    assert candidate.meta["parent_version"] == 1 and candidate.meta["data_file"] == str(data)
    assert candidate.meta["recipe"]["max_steps"] == 2 and candidate.meta["recipe"]["learning_rate"] == 5e-3
    metrics = json.loads((candidate.path / "metrics.json").read_text())
    assert (metrics["train_examples"], metrics["heldout_examples"], metrics["train_steps"]) == (4, 4, 2)
    assert metrics["reward_accuracy"] is not None and metrics["log_history"]
    assert not (persona_home / "feedback.duckdb").exists()                  # it never opened the store


def test_gate():
    recipe = DPORecipe(min_reward_accuracy=0.55, max_sft_nll_increase=0.1)
    good = {"reward_accuracy": 0.8, "reward_margin": 0.3, "sft_nll_candidate": 3.1, "sft_nll_active": 3.0,
            "sanity_answers": ["Go for a walk, then sleep early.", "Study the summary tonight."]}
    assert check(good, recipe) == []
    reasons = check({**good, "reward_accuracy": 0.5, "sft_nll_candidate": 3.6,
                     "sanity_answers": ["", "yes yes yes yes yes yes yes yes yes"]}, recipe)
    assert len(reasons) == 3 and "0.50" in reasons[0] and "20.0%" in reasons[1] and "2 of 2" in reasons[2]
    # A model that already loops on these prompts is not held against its candidate.
    looping = {**good, "sanity_answers_active": ["", "no no no no no no no no no"],
               "sanity_answers": ["", "ok ok ok ok ok ok ok ok ok"]}
    assert check(looping, recipe) == []
    assert check({**good, "reward_accuracy": None}, recipe) == ["no held-out pairs to judge it on"]
    assert degenerate("the cat the cat the cat the cat the cat the cat") and not degenerate("Fine, thanks.")


def test_bench_train_prints_every_configuration(tiny_model_dir):
    from test_cli import persona

    result = persona("bench", "train", "--steps", "1", "--batch-size", "2", "--base-model", str(tiny_model_dir),
                     env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip()[:4] for r in rows] == ["ours", "ours", "TRL'", "plai"]
    assert "1.00x" in rows[0] and "1.00x" in rows[3] and "precomputed once" in result.stdout


def test_lean_dpo_loss_equals_trls(tiny_persona, tiny_model_dir, tmp_path):
    """The lean loss (LM head at completion positions only) gives TRL's log-probs and loss."""
    import math

    import torch
    from trl import DPOTrainer

    from train import base_model, dpo, registry

    rows = dpo.read_preferences(pairs_file(tmp_path / "pairs.parquet", n_train=8, n_heldout=0)).train
    rows[1]["rejected"] = [{"role": "assistant", "content": "No."}]  # uneven lengths: padding in the batch
    recipe = DPORecipe(batch_size=4, max_steps=1)
    tokenizer = base_model.load_tokenizer(str(tiny_model_dir))
    model, _ = dpo.load_policy(str(tiny_model_dir), registry.active("tiny").path, recipe, cuda=False)
    trainer = dpo.make_trainer(model, tokenizer, rows, dpo.trainer_config(recipe, "dpo", False, tmp_path / "o"), "dpo")
    assert type(trainer).__name__ == "LeanDPOTrainer"
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["weight"].tolist() == [1.0] * 4                     # a file without weights: all 1
    unweighted = {k: v for k, v in batch.items() if k != "weight"}   # what TRL's own code takes
    with torch.no_grad():
        # Before any step the policy is the reference: our log-probs, TRL's reference log-probs
        # and the precomputed ones in the batch (ours, through the "ref" adapter) agree.
        ours = dpo.completion_logps(model, batch)
        trls = torch.cat(DPOTrainer.compute_ref_log_probs(trainer, model, unweighted))
        assert torch.allclose(ours, trls, atol=1e-3), (ours, trls)
        precomputed = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        assert torch.allclose(precomputed, trls, atol=1e-3)
        for name, param in model.named_parameters():  # move the policy away from the reference
            if "lora_B.default" in name:
                param.add_(torch.randn_like(param) * 0.05)
        lean = trainer.compute_loss(model, batch).item()
        reference = DPOTrainer._compute_loss(trainer, model, unweighted, False).item()
        # Weights scale each pair's loss; the batch's mean of weight x loss.
        per_pair = [DPOTrainer._compute_loss(trainer, model, dpo._pairs(unweighted, torch.tensor([i]), 4),
                                             False).item() for i in range(4)]
        weights = torch.tensor([0.0, 2.0, 1.5, 0.5])
        weighted = trainer.compute_loss(model, {**batch, "weight": weights}).item()
    assert abs(lean - math.log(2)) > 1e-3
    assert abs(lean - reference) < 1e-4, (lean, reference)
    assert abs(weighted - sum(w * x for w, x in zip(weights.tolist(), per_pair)) / 4) < 1e-4


def target_and_others(kind: str, weight: float) -> list[dict]:
    """The example under test (prompt "target") at ``weight``, then three others at weight 1."""
    prompt = lambda text: [{"role": "system", "content": "Be short."}, {"role": "user", "content": text}]  # noqa: E731
    say = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    if kind == "dpo":
        rows = [{"prompt": prompt(p), "chosen": say(c), "rejected": say(r), "weight": 1.0}
                for p, c, r in [("target", SHORT, LONG)] + [(f"q{i}", "Yes, sure.", "Maybe later, who knows.")
                                                          for i in range(3)]]
    else:
        rows = [{"prompt": prompt(p), "completion": say(c), "label": y, "weight": 1.0}
                for p, c, y in [("target", SHORT, True)] + [(f"q{i}", "Yes, sure." if i % 2 else "Maybe later.",
                                                           bool(i % 2)) for i in range(3)]]
    rows[0]["weight"] = weight
    return rows


def target_reward(tiny_model_dir, tmp_path, kind: str, weight: float, **recipe) -> float:
    """Train from the active adapter on ``target_and_others``; the target's implicit reward after it
    (a DPO pair's margin, a KTO example's reward), each run from the same start."""
    from train import base_model, dpo, registry

    recipe = DPORecipe(epochs=6, learning_rate=5e-3, batch_size=4, logging_steps=100, seed=0, **recipe)
    tokenizer = base_model.load_tokenizer(str(tiny_model_dir))
    model, _ = dpo.load_policy(str(tiny_model_dir), registry.active("tiny").path, recipe, cuda=False)
    rows = target_and_others(kind, weight)
    trainer = dpo.make_trainer(model, tokenizer, rows, dpo.trainer_config(recipe, kind, False, tmp_path / "o"),
                               kind)
    trainer.train()
    target = rows[0]
    if kind == "dpo":   # the margin: chosen scored as desirable, rejected as undesirable
        judged = [{"prompt": target["prompt"], "completion": target["chosen"], "label": True},
                  {"prompt": target["prompt"], "completion": target["rejected"], "label": False}]
        return dpo.kto_heldout(model, tokenizer, judged, recipe.beta)["reward_margin"]
    return dpo.kto_heldout(model, tokenizer, [target], recipe.beta)["rewards_desirable"]


@pytest.mark.parametrize("kind,recipe", [("dpo", {}), ("dpo", {"precompute_ref": False}), ("kto", {})],
                         ids=["dpo-lean", "dpo-trl", "kto"])
def test_a_lighter_example_moves_the_adapter_less(tiny_persona, tiny_model_dir, tmp_path, kind, recipe):
    """The same example among the same others, from the same start: at weight 0.1 it is learned
    less than at weight 1 (the lean DPO loss, TRL's DPO loss, KTO's). What the others teach moves
    the target too, so each run is measured against the run where the target weighs 0."""
    alone, light, full = (target_reward(tiny_model_dir, tmp_path / str(w), kind, w, **recipe) for w in (0, 0.1, 1))
    assert full - alone > 3 * (light - alone) and full > light, (alone, light, full)


def away_from_the_persona(path, n: int = 16):
    """Pairs whose chosen answer is not the persona's (its dialogues all answer SHORT)."""
    rows = [{"prompt": [{"role": "system", "content": "Be short."}, {"role": "user", "content": f"q{i}"}],
             "chosen": [{"role": "assistant", "content": "Maybe later, who knows, it is hard to say."}],
             "rejected": [{"role": "assistant", "content": SHORT}], "split": "train"} for i in range(n)]
    return write_parquet(path, rows)


def test_the_persona_anchor_holds_the_persona_loss(tiny_persona, tiny_model_dir, tmp_path):
    """Votes that pull away from the persona's own answers raise its held-out loss; the SFT
    term on its training dialogues (persona_anchor) holds it (here, where the held-out and the
    training answers are alike, it even lowers it), and the run logs the anchor's NLL."""
    from train import dpo

    data = away_from_the_persona(tmp_path / "away.parquet")
    rise = {}
    for anchor in (0.0, 2.0):
        recipe = DPORecipe(epochs=3, learning_rate=5e-3, batch_size=4, logging_steps=1, sanity_max_tokens=4,
                           reward_model="none", persona_anchor=anchor, rpo_alpha=0.0, min_pairs=1)
        _, metrics = dpo.run(tiny_persona, data, recipe, str(tiny_model_dir))
        rise[anchor] = metrics["sft_nll_candidate"] - metrics["sft_nll_active"]
        logged = [h["anchor/nll"] for h in json.loads((_.path / "metrics.json").read_text())["log_history"]
                  if "anchor/nll" in h]
        assert bool(logged) == (anchor > 0)
    assert rise[0.0] > 0.02, rise                   # the pull away is real
    assert rise[2.0] < rise[0.0] - 0.1, rise        # and the anchor more than holds it


def test_labelled_nll_is_the_models_own_loss(tiny_model_dir):
    """The NLL with the LM head at labelled positions only equals the model's loss over full logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from train import base_model
    from train.chat_tokens import IGNORE, tokenize_chat
    from train.evaluate import labelled_nll

    tokenizer = base_model.load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    batch = [tokenize_chat(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
             for q, a in (("hi", SHORT), ("a longer question here?", LONG))]
    total, count = labelled_nll(model, batch, tokenizer.pad_token_id)
    expected, tokens = 0.0, 0
    for t in batch:
        labels = torch.tensor([t.labels])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([t.input_ids])).logits[0, :-1]
        keep = labels[0, 1:] != IGNORE
        expected += torch.nn.functional.cross_entropy(logits[keep], labels[0, 1:][keep], reduction="sum").item()
        tokens += int(keep.sum())
    assert count == tokens and total.item() == pytest.approx(expected, rel=1e-4)


def test_a_run_measures_only_its_candidate_what_the_active_versions_run_measured_is_reused(
        tiny_persona, tiny_model_dir, tmp_path):
    """From a DPO-made active version, the active and SFT versions' persona loss, refusal loss and
    consistency come from its own record (the same adapters on the same data); edited held-out
    dialogues are measured again."""
    from train import dpo, registry

    recipe = DPORecipe(epochs=1, learning_rate=5e-3, batch_size=4, sanity_max_tokens=4, reward_model="none")
    data = pairs_file(tmp_path / "pairs.parquet")
    first, m1 = dpo.run(tiny_persona, data, recipe, str(tiny_model_dir))
    registry.set_active("tiny", first.version)
    _, m2 = dpo.run(tiny_persona, data, recipe, str(tiny_model_dir))
    assert m2["sft_nll_active"] == m1["sft_nll_candidate"] and m2["sft_nll_sft"] == m1["sft_nll_sft"]
    assert m2["safety_nll_active"] == m1["safety_nll_candidate"]
    assert m2["consistency_active"] == m1["consistency_candidate"]
    assert m2["consistency_sft"] == m1["consistency_sft"]
    heldout = tiny_persona.resolve("data/heldout.jsonl")
    heldout.write_text(heldout.read_text().replace("Do it now.", "Do it now, please."))
    _, m3 = dpo.run(tiny_persona, data, recipe, str(tiny_model_dir))
    assert m3["sft_nll_active"] != m1["sft_nll_candidate"] and m3["sft_nll_data"] != m1["sft_nll_data"]


def test_setup_scores_the_sft_version_as_a_run_would_and_the_first_run_reuses_it(
        tiny_persona, tiny_model_dir, tmp_path, monkeypatch):
    """train.baseline measures an SFT version (consistency, persona and refusal losses) to the
    figures a preference run measures for it, records them in its meta, and the first run from
    it then scores only its candidate."""
    from train import baseline, consistency, dpo, registry

    recipe = DPORecipe(epochs=1, learning_rate=5e-3, batch_size=4, sanity_max_tokens=4, reward_model="none")
    data = pairs_file(tmp_path / "pairs.parquet")
    _, fresh = dpo.run(tiny_persona, data, recipe, str(tiny_model_dir))   # v1 measured by the run
    sft = registry.get("tiny", 1)
    assert baseline.missing(tiny_persona, sft)
    figures = baseline.measure(tiny_persona, sft, str(tiny_model_dir))
    assert figures["consistency_candidate"] == figures["consistency_sft"] == fresh["consistency_active"]
    assert figures["sft_nll_candidate"] == pytest.approx(fresh["sft_nll_active"], rel=1e-5)
    assert figures["safety_nll_candidate"] == pytest.approx(fresh["safety_nll_active"], rel=1e-5)
    sft = registry.get("tiny", 1)
    assert sft.meta["metrics"]["consistency_candidate"] == figures["consistency_candidate"]
    assert sft.meta["kind"] == "sft" and not baseline.missing(tiny_persona, sft)
    scored = []
    greedy = consistency.greedy_answers
    monkeypatch.setattr(consistency, "greedy_answers", lambda m, t, p, adapter: scored.append(adapter) or
                        greedy(m, t, p, adapter))
    _, reused = dpo.run(tiny_persona, data, recipe, str(tiny_model_dir))
    assert scored == ["default"]                                           # the candidate only
    assert reused["consistency_active"] == reused["consistency_sft"] == figures["consistency_candidate"]
    assert reused["sft_nll_active"] == reused["sft_nll_sft"] == figures["sft_nll_candidate"]
    assert reused["safety_nll_active"] == figures["safety_nll_candidate"]
    heldout = tiny_persona.resolve("data/heldout.jsonl")                   # edited prompts: stale scores
    heldout.write_text(heldout.read_text().replace("question", "query"))
    assert baseline.missing(tiny_persona, registry.get("tiny", 1))
