"""Languages: the default recipe trains the languages the base model speaks, the gate's
repetition check reads both scripts, and the length-bias statistic counts words where a
script separates them and characters where it does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train import base_model
from train.dpo import SANITY_PROMPTS, sanity_prompts
from train.gate import degenerate
from train.personas import list_persona_names, load_persona
from train.recipes import SFTRecipe, load_recipe, sft_languages
from train.data import load_file


def model_folder(tmp_path: Path, record: dict | None = None, card: str | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    if record is not None:
        (folder / "builtin.json").write_text(json.dumps(record))
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def test_a_built_in_models_record_names_its_languages(tmp_path):
    gemma = model_folder(tmp_path, {"name": "gemma-3-270m", "languages": list(base_model.GEMMA3.languages)})
    assert base_model.languages(gemma) == ["en", "ko"]
    assert base_model.SMOLLM2.languages == ("en",)


def test_another_model_declares_its_languages_in_its_card(tmp_path):
    card = "---\nlicense: apache-2.0\nlanguage:\n- en\n- ko\n- ja\n---\n# A model\n"
    assert base_model.languages(model_folder(tmp_path, card=card)) == ["en", "ko", "ja"]
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "README.md").write_text("---\nlanguage: ko\n---\n")
    assert base_model.languages(tmp_path / "one") == ["ko"]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "README.md").write_text("# no front matter\nlanguage: ko\n")
    assert base_model.languages(tmp_path / "none") == ["en"]      # nothing declared: English


def test_the_default_recipe_follows_the_model_and_a_recipe_or_flag_overrides_it(tmp_path):
    recipe = load_recipe("sft")
    assert recipe.languages is None
    gemma = model_folder(tmp_path, {"languages": ["en", "ko"]})
    assert sft_languages(recipe, str(gemma)) == ["en", "ko"]
    assert sft_languages(recipe, str(tmp_path)) == ["en"]        # no record, no card
    assert sft_languages(SFTRecipe(languages=["ko"]), str(gemma)) == ["ko"]
    assert load_recipe("sft-multilingual").languages == ["en", "ko"]


def test_persona_train_sft_records_the_base_models_languages(tiny_model_dir, tmp_path, monkeypatch):
    """`persona train sft` without --languages on a model that speaks en and ko trains both,
    measures each language's held-out loss on its own, and records them."""
    import shutil

    from serve.cli import main
    from train import registry

    model = tmp_path / "bilingual"
    shutil.copytree(tiny_model_dir, model)
    (model / "builtin.json").write_text(json.dumps({"name": "tiny", "languages": ["en", "ko"]}))
    data = tmp_path / "personas" / "data"
    data.mkdir(parents=True)
    rows = {"en": [("Tea or coffee?", "Coffee. Drink it."), ("I'm bored.", "Walk outside. Now.")],
            "ko": [("차 마실까 커피 마실까?", "커피. 지금 마셔."), ("심심해.", "밖에 나가서 걸어. 지금.")]}
    for lang, pairs in rows.items():
        for split, (q, a) in zip(("train", "heldout"), pairs):
            (data / f"{split}_{lang}.jsonl").write_text(json.dumps({"prompt": q, "response": a},
                                                                   ensure_ascii=False) + "\n")
    (tmp_path / "personas" / "tiny.yaml").write_text(
        "name: tiny\ndisplay_name: Tiny\ndescription: test\nsystem_prompt: Be short.\nlanguages: [en, ko]\n"
        "data:\n  train: [{path: data/train_en.jsonl, language: en}, {path: data/train_ko.jsonl, language: ko}]\n"
        "  heldout: [{path: data/heldout_en.jsonl, language: en}, {path: data/heldout_ko.jsonl, language: ko}]\n")
    monkeypatch.setenv("PERSONA_PERSONAS_DIR", str(tmp_path / "personas"))
    main(["train", "sft", "--persona", "tiny", "--base-model", str(model), "--max-steps", "1"])
    version = registry.active("tiny")
    assert version.meta["recipe"]["languages"] == ["en", "ko"]
    metrics = json.loads((version.path / "metrics.json").read_text())
    by_language = metrics["heldout_by_language"]
    assert set(by_language) == {"en", "ko"}
    assert all(by_language[lang]["heldout_examples"] == 1 for lang in ("en", "ko"))
    tokens = sum(m["heldout_answer_tokens"] for m in by_language.values())
    assert tokens == metrics["heldout_answer_tokens"]
    pooled = sum(m["heldout_nll_adapter"] * m["heldout_answer_tokens"] for m in by_language.values()) / tokens
    assert metrics["heldout_nll_adapter"] == pytest.approx(pooled, abs=1e-3)
    assert by_language["en"]["heldout_nll_adapter"] != by_language["ko"]["heldout_nll_adapter"]
    import io

    from rich.console import Console

    from serve import cli_commands

    out = io.StringIO()
    monkeypatch.setattr(cli_commands, "console", Console(file=out, width=400))
    main(["adapters", "list", "--persona", "tiny"])
    listed = out.getvalue()
    assert "held-out en" in listed and "held-out ko" in listed
    assert f"{by_language['ko']['heldout_nll_adapter']:.3f}" in listed

    main(["train", "sft", "--persona", "tiny", "--base-model", str(model), "--max-steps", "1", "--languages", "en"])
    assert registry.active("tiny").meta["recipe"]["languages"] == ["en"]
    only_en = json.loads((registry.active("tiny").path / "metrics.json").read_text())["heldout_by_language"]
    assert set(only_en) == {"en"}


def test_adapters_list_shows_a_column_per_language():
    from serve.cli_commands import language_cells

    metrics = {"heldout_by_language": {"en": {"heldout_nll_adapter": 2.5, "heldout_nll_reduction": 0.2},
                                       "ko": {"heldout_nll_adapter": 3.25, "heldout_nll_reduction": 0.31}}}
    assert language_cells(metrics, ["en", "ko"]) == ["2.500 (-20.0%)", "3.250 (-31.0%)"]
    assert language_cells({}, ["en"]) == ["-"]


# ---- the gate's repetition check -----------------------------------------------------------
LOOPS = [
    "오늘 아침 7시에 일어나고, 오늘 아침 7시에 일어나고, 오늘 아침 7시에 일어나고, 오늘 아침",
    "I am here. I am here. I am here.",
    "Okay. Drink water, then open the book and read ten pages. I am here. I am here. I am here. I am",
    "좋아, 지금 바로 시작하자. 책상 정리하고 타이머 맞춰. 할 수 있어 할 수 있어 할 수 있어 할 수 있어",
    "", "   ",
]
NORMAL = [
    "Go. Go. Go.", "ㅋㅋㅋㅋㅋㅋ 그거 완전 웃기다", "I am here. I am here for you.",
    "오늘은 푹 쉬어. 내일 아침에 다시 생각해도 늦지 않아.",
    "Sleep early. Then run.",
]


@pytest.mark.parametrize("text", LOOPS)
def test_a_repeated_phrase_is_degenerate(text):
    assert degenerate(text)


@pytest.mark.parametrize("text", NORMAL)
def test_normal_answers_are_not(text):
    assert not degenerate(text)


@pytest.mark.parametrize("name", list_persona_names())
def test_no_held_out_answer_of_the_persona_is_flagged(name):
    """The false-positive rate on the persona's own held-out answers, in every language, is 0."""
    persona = load_persona(name)
    answers = {f.language: [e.messages[-1]["content"] for e in load_file(persona.resolve(f.path), f.language)]
               for f in persona.data.heldout}
    assert set(answers) == {"en", "ko"}
    flagged = [a for texts in answers.values() for a in texts if degenerate(a)]
    assert flagged == []


def test_sanity_prompts_are_in_english_and_the_trained_languages():
    assert sanity_prompts(["en"]) == SANITY_PROMPTS["en"]
    both = sanity_prompts(["en", "ko"])
    assert both == SANITY_PROMPTS["en"] + SANITY_PROMPTS["ko"]
    assert sanity_prompts(["ko"]) == both                 # English always
    assert all(any("\uac00" <= c <= "\ud7a3" for c in p) for p in SANITY_PROMPTS["ko"])


# ---- length bias -------------------------------------------------------------------------
def test_text_length_counts_words_or_characters_by_script():
    from feedback.stats import text_length

    assert text_length("I am here") == 3
    assert text_length("오늘 일찍 자") == 3                  # Hangul: words, separated by spaces
    assert text_length("我今天很累") == 5                    # no spaces: characters
    assert text_length("今日は疲れた") == 6
    assert text_length("Hi 你好") == 3
    assert text_length("") == 0


def test_the_dashboard_shows_held_out_loss_per_language(tmp_path):
    """The adapters table of the dashboard, read from the store the gateway mirrors the
    registry into: a column per language, before (base model) and after (adapter)."""
    from feedback import stats
    from feedback.store import Store
    from serve.ui.app import adapter_table

    metrics = {"heldout_nll_adapter": 2.8, "heldout_by_language": {
        "en": {"heldout_nll_base": 3.0, "heldout_nll_adapter": 2.5},
        "ko": {"heldout_nll_base": 4.0, "heldout_nll_adapter": 3.1}}}
    store = Store.open(tmp_path / "f.duckdb")
    try:
        store.sync_adapters([{"name": "teto-v1", "persona": "teto", "version": 1, "path": "/x", "kind": "sft",
                              "parent_version": None, "status": "active", "metrics": metrics, "created_at": None}])
        table = adapter_table(stats.summary(store)["adapters"])
    finally:
        store.close()
    row = table.to_dict("records")[0]
    assert (row["held-out NLL en"], row["held-out NLL en before"]) == (2.5, 3.0)
    assert (row["held-out NLL ko"], row["held-out NLL ko before"]) == (3.1, 4.0)
    assert row["heldout_nll_adapter"] == 2.8
