"""Every environment variable is declared once, typed and documented."""

import re
from pathlib import Path


from feedback import settings

REPO = Path(__file__).resolve().parents[1]


def test_every_variable_used_in_the_code_is_declared():
    used = set()
    for path in REPO.glob("[sftb]*/**/*.py"):
        used |= set(re.findall(r"\bPERSONA_[A-Z_]+\b", path.read_text(encoding="utf-8")))
    declared = set(settings.VARIABLES)
    assert used - declared == set(), "undeclared environment variables"
    assert all(v.doc for v in settings.VARIABLES.values())


def test_home_follows_the_environment(persona_home):
    assert settings.home() == persona_home.resolve()
    assert persona_home.is_dir()


def test_keys_are_parsed_and_masked(monkeypatch):
    monkeypatch.setenv("PERSONA_API_KEY", "k1, k2,")
    assert settings.get("PERSONA_API_KEY") == ("k1", "k2")
    shown = dict((n, v) for n, v, _ in settings.describe())
    assert shown["PERSONA_API_KEY"] == "***" and "k1" not in str(settings.describe())


def test_defaults_apply_when_unset():
    assert settings.get("PERSONA_BASE_MODEL") == settings.DEFAULT_BASE_MODEL
    assert settings.get("PERSONA_API_KEY") == ()
