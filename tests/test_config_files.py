"""Every shipped persona, recipe and dataset record parses and validates."""

from pathlib import Path

import pytest

from train.config import ConfigError
from train.data import load_file
from train.personas import list_persona_names, load_persona, load_persona_file
from train.recipes import RECIPES_DIR, DPORecipe, SFTRecipe, load_recipe

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
PERSONAS = list_persona_names()


def test_the_shipped_personas_are_there():
    assert {"teto", "egen"} <= set(PERSONAS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(path):
    cls = DPORecipe if path.stem.startswith("dpo") else SFTRecipe   # preference recipes vs SFT recipes
    assert isinstance(load_recipe(str(path), cls), cls)


@pytest.mark.parametrize("name", PERSONAS)
def test_every_persona_parses_and_names_a_real_recipe(name):
    persona = load_persona(name)
    assert persona.system_prompt and persona.display_name and persona.description
    load_recipe(persona.recipe)


@pytest.mark.parametrize("name", PERSONAS)
def test_every_record_validates_and_the_data_is_large_enough(name):
    persona = load_persona(name)
    counts = {}
    for split in ("train", "heldout", "safety"):
        for f in getattr(persona.data, split):
            examples = load_file(persona.resolve(f.path), f.language)
            counts[(split, f.language)] = counts.get((split, f.language), 0) + len(examples)
    assert counts[("train", "en")] >= 300 and counts[("train", "ko")] >= 100
    assert counts[("heldout", "en")] >= 40 and counts[("heldout", "ko")] >= 30   # each language measured on 30+
    assert counts[("safety", "en")] >= 20 and counts[("safety", "ko")] >= 10   # refusals the gate checks


@pytest.mark.parametrize("name", PERSONAS)
def test_heldout_prompts_never_appear_in_training(name):
    """Neither the held-out dialogues nor the held-out refusals (safety) are trained on."""
    persona = load_persona(name)
    seen = {m["content"].strip().lower()
            for f in persona.data.train for e in load_file(persona.resolve(f.path), f.language)
            for m in e.messages if m["role"] == "user"}
    held = persona.data.heldout + persona.data.safety
    assert persona.data.safety and not {f.path for f in held} & {f.path for f in persona.data.train}
    for f in held:
        for e in load_file(persona.resolve(f.path), f.language):
            assert e.messages[-2]["content"].strip().lower() not in seen, e.source
    heldout_prompts = [e.messages[-2]["content"].strip().lower() for f in persona.data.heldout
                       for e in load_file(persona.resolve(f.path), f.language)]
    assert len(heldout_prompts) == len(set(heldout_prompts))      # no held-out prompt twice


def test_unknown_recipe_key_is_an_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("epochs: 1\nlearnig_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'learnig_rate'"):
        load_recipe(str(path))
    path.write_text("lora: {r: 8, alfa: 4}\n")
    with pytest.raises(ConfigError, match=r"key 'lora': unknown key 'alfa'"):
        load_recipe(str(path))


@pytest.mark.parametrize("text,message", [
    ("batch_size: eight\n", "expected int"),
    ("batch_size: 0\n", "must be positive"),
    ("qlora: maybe\n", "must be one of"),
    ("epochs: [1]\n", "expected float"),
    ("epochs: 1\n  bad: indentation\n", "invalid YAML"),
    ("- a list\n", "mapping"),
])
def test_bad_recipe_values_are_named(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_recipe(str(path))


def test_persona_errors_name_the_key(tmp_path):
    src = Path(load_persona("teto").source).read_text()
    (tmp_path / "data").symlink_to(Path(load_persona("teto").source).parent / "data")
    bad = tmp_path / "teto.yaml"
    bad.write_text(src.replace("languages: [en, ko]", "languages: [en]"))
    with pytest.raises(ConfigError, match="language 'ko', not one of"):
        load_persona_file(bad)
    bad.write_text(src + "mood: sunny\n")
    with pytest.raises(ConfigError, match="unknown key 'mood'"):
        load_persona_file(bad)
    bad.write_text(src.replace("data/teto/safety_en.jsonl", "data/teto/refusals.jsonl"))
    with pytest.raises(ConfigError, match="data.safety file data/teto/refusals.jsonl does not exist"):
        load_persona_file(bad)
