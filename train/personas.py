"""Persona definitions: ``personas/<name>.yaml``.

A persona names its system prompt, its languages, its training and held-out
dialogue files (paths relative to the YAML file) and the SFT recipe it uses.
Held-out splits are never trained on: ``heldout`` judges the persona's voice,
``safety`` (refusals of harmful requests) lets the retraining gate check that a
candidate keeps refusing.

    from train.personas import load_persona, list_personas
    teto = load_persona("teto")
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from feedback import settings
from train.config import ConfigError, build, read_yaml

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass
class DataFile:
    path: str
    language: str  # ISO 639-1 code of the file's records, e.g. "en", "ko"


@dataclass
class PersonaData:
    train: list[DataFile]
    heldout: list[DataFile] = field(default_factory=list)
    safety: list[DataFile] = field(default_factory=list)  # held-out refusals the gate measures


SPLITS = ("train", "heldout", "safety")


@dataclass
class Persona:
    name: str
    display_name: str
    description: str
    system_prompt: str
    languages: list[str]
    data: PersonaData
    recipe: str = "sft"  # a recipe name under train/recipes/ or a YAML path
    # The description in other languages ({"ko": "..."}), shown to a browser that asks for one.
    descriptions: dict[str, str] = field(default_factory=dict)
    source: Path | None = None  # the YAML file, set by the loader

    def resolve(self, rel: str) -> Path:
        base = self.source.parent if self.source else settings.personas_dir()
        return (base / rel).resolve()

    def files(self, split: str, languages: list[str] | None = None) -> list[DataFile]:
        """The files of a split ("train", "heldout" or "safety"), those in ``languages`` only if given."""
        files = getattr(self.data, split)
        return [f for f in files if languages is None or f.language in languages]


def persona_path(name: str) -> Path:
    return settings.personas_dir() / f"{name}.yaml"


def load_persona_file(path: Path) -> Persona:
    raw = read_yaml(path)
    raw.pop("source", None)
    persona = build(Persona, raw, str(path))
    persona.source = Path(path).resolve()
    _check(persona, path)
    return persona


def _check(p: Persona, path: Path) -> None:
    if not NAME_RE.match(p.name):
        raise ConfigError(f"{path}: key 'name': {p.name!r} must be lowercase letters, digits, '-' or '_'")
    if Path(path).stem != p.name:
        raise ConfigError(f"{path}: key 'name' is {p.name!r} but the file is named {Path(path).name}")
    if not p.system_prompt.strip():
        raise ConfigError(f"{path}: key 'system_prompt' is empty")
    if not p.data.train:
        raise ConfigError(f"{path}: key 'data.train' lists no files")
    for split in SPLITS:
        for f in getattr(p.data, split):
            if f.language not in p.languages:
                raise ConfigError(
                    f"{path}: data.{split} file {f.path} has language {f.language!r}, "
                    f"not one of the persona's languages {p.languages}"
                )
            if not p.resolve(f.path).is_file():
                raise ConfigError(f"{path}: data.{split} file {f.path} does not exist")


def load_persona(name: str) -> Persona:
    path = persona_path(name)
    if not path.is_file():
        known = ", ".join(list_persona_names()) or "none"
        raise ConfigError(f"unknown persona {name!r}: no {path} (known personas: {known})")
    return load_persona_file(path)


def list_persona_names() -> list[str]:
    folder = settings.personas_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def list_personas() -> list[Persona]:
    return [load_persona(n) for n in list_persona_names()]
