"""What the gateway serves: personas, their adapter versions and the active one.

The gateway does not read the adapter registry itself (in ``serve`` only the
CLI root, ``serve/cli*.py``, imports ``train``); the CLI root builds a ``Catalog``
from it and hands the gateway a function that builds a fresh one, which the
gateway calls on reload.

Public model ids: ``teto`` (the persona's active adapter) and ``teto@v3`` (a
pinned version). Engine model names: ``teto-v3``, by ``feedback.naming``, the
rule the registry names its versions by. A version the registry refuses to serve
(rejected by the gate, retired) is not listed and pinning it is a 404 that says why:
a version the gate refused must not reach users, nor the votes the loop trains on,
through a pin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from feedback.naming import engine_name

PINNED_RE = re.compile(r"^(?P<persona>[a-z][a-z0-9_-]{0,31})@v(?P<version>\d+)$")


@dataclass(frozen=True)
class PersonaInfo:
    name: str
    system_prompt: str
    display_name: str = ""
    description: str = ""
    descriptions: dict[str, str] = field(default_factory=dict)  # in other languages: {"ko": "..."}
    active: int | None = None                             # active adapter version, None = no adapter yet
    candidate: int | None = None                          # version under test against the active one
    versions: dict[int, str] = field(default_factory=dict)  # version -> adapter folder
    # Versions not served, with why ("rejected: <reason>", "retired: <reason>"); from the registry.
    unservable: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """Where one request goes."""

    model_id: str          # public id that answered, e.g. teto@v3
    persona: str
    version: int
    adapter: str           # engine model name, e.g. teto-v3
    path: str
    system_prompt: str


class UnknownModel(LookupError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Catalog:
    personas: dict[str, PersonaInfo]

    def model_ids(self) -> list[tuple[str, str | None]]:
        """(public id, parent) pairs: each persona with an adapter, then its pinned versions."""
        ids: list[tuple[str, str | None]] = []
        for p in self.personas.values():
            if p.active is not None:
                ids.append((p.name, None))
        for p in self.personas.values():
            ids.extend((f"{p.name}@v{v}", p.name) for v in sorted(p.versions) if v not in p.unservable)
        return ids

    def kept_adapters(self) -> set[str]:
        """Engine names of the active and candidate versions: never unloaded as pinned versions."""
        return {engine_name(p.name, v) for p in self.personas.values() for v in (p.active, p.candidate)
                if v is not None}

    def unservable_adapters(self) -> set[str]:
        """Engine names of the versions the registry refuses to serve."""
        return {engine_name(p.name, v) for p in self.personas.values() for v in p.unservable}

    def active_targets(self) -> list[Target]:
        return [self.resolve(p.name) for p in self.personas.values() if p.active is not None]

    def resolve(self, model: str) -> Target:
        pinned = PINNED_RE.match(model)
        name = pinned.group("persona") if pinned else model
        persona = self.personas.get(name)
        if persona is None:
            known = ", ".join(sorted(self.personas)) or "none"
            raise UnknownModel(f"The model `{model}` does not exist. Known personas: {known}; "
                               "pin a version as persona@vN.")
        version = int(pinned.group("version")) if pinned else persona.active
        if version is None:
            raise UnknownModel(f"The persona `{name}` has no trained adapter yet (run: persona train sft "
                               f"--persona {name}).")
        if version in persona.unservable:
            raise UnknownModel(f"The model `{model}` is not served: {name} v{version} was "
                               f"{persona.unservable[version]}.")
        if version not in persona.versions:
            known = ", ".join(f"v{v}" for v in sorted(persona.versions)) or "none"
            raise UnknownModel(f"The model `{model}` does not exist: {name} has versions {known}.")
        return Target(f"{name}@v{version}", name, version, engine_name(name, version),
                      persona.versions[version], persona.system_prompt)
