"""The Dockerfile's promises that hadolint (``make lint-docker``) does not check.

Plain text parsing: no docker, no network.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each named stage's instructions (after its FROM)."""
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in instructions((ROOT / "Dockerfile").read_text(encoding="utf-8")):
        if word == "FROM":
            match = re.search(r"\s+AS\s+(\S+)\s*$", rest, re.IGNORECASE)
            current = match.group(1).lower() if match else f"stage{len(result)}"
            result[current] = [(word, rest)]
        elif current is not None:
            result[current].append((word, rest))
    return result


def env_values(stage: list[tuple[str, str]]) -> dict[str, str]:
    values = {}
    for word, rest in stage:
        if word == "ENV":
            for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", rest):
                values[key] = value.strip('"')
    return values


def test_both_targets_exist_and_cpu_is_the_default():
    names = list(stages())
    assert "cpu" in names and "cuda" in names, names
    assert names[-1] == "cpu", "`docker build .` builds the last stage: it should be cpu"


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_target_runs_as_a_non_root_user(target):
    users = [rest for word, rest in stages()[target] if word == "USER"]
    assert users, f"{target}: no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{target}: runs as {users[-1]}"


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_persona_home_is_a_volume(target):
    stage = stages()[target]
    home = env_values(stage).get("PERSONA_HOME")
    assert home, f"{target}: no ENV PERSONA_HOME"
    volumes = " ".join(rest for word, rest in stage if word == "VOLUME")
    assert re.search(rf"(^|[\s\"\[]){re.escape(home)}($|[\s\"\],])", volumes), \
        f"{target}: VOLUME {volumes!r} does not hold PERSONA_HOME={home}"


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_healthcheck_exposed_port_and_public_bind(target):
    stage = stages()[target]
    checks = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert checks and "/health" in checks[-1] and "7860" in checks[-1], f"{target}: {checks}"
    assert any(word == "EXPOSE" and "7860" in rest for word, rest in stage), f"{target}: no EXPOSE 7860"
    cmd = [rest for word, rest in stage if word == "CMD"][-1]
    assert "persona setup" in cmd and "persona up" in cmd and "--host 0.0.0.0" in cmd, cmd


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_install_goes_through_the_makefile(target):
    runs = [rest for word, rest in stages()[target] if word == "RUN"]
    installs = [r for r in runs if re.search(r"\bmake\b[^&|;]*\binstall\b", r)]
    assert installs, f"{target}: no RUN with `make install` (the README's install steps)"
    assert not any(re.search(r"\bpip3?\s+install\b", r) for r in runs), \
        f"{target}: pip install outside the Makefile; add it to the Makefile's install target instead"


def test_cuda_target_serves_with_vllm_from_its_own_environment():
    stage = stages()["cuda"]
    runs = " ".join(rest for word, rest in stage if word == "RUN")
    assert re.search(r"\bmake\b.*\bvllm-env\b", runs), "cuda: vLLM is not installed with `make vllm-env`"
    venv = re.search(r"VLLM_VENV=(\S+)", runs)
    assert venv, "cuda: make vllm-env without VLLM_VENV"
    assert env_values(stage).get("PERSONA_VLLM_PYTHON") == f"{venv.group(1)}/bin/python"
    cmd = [rest for word, rest in stage if word == "CMD"][-1]
    assert "--engine vllm" in cmd, cmd


def test_dockerignore_keeps_local_environments_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".venv-vllm", ".git", "test-output"} <= ignored, ignored


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_image_installs_the_runtime_lock_without_test_tools(target):
    """`make install-runtime` takes requirements-runtime.lock (no dev extra); plain `make install`
    would bring pytest, playwright, schemathesis and hadolint into the image."""
    runs = [rest for word, rest in stages()[target] if word == "RUN"]
    makes = [r for r in runs if re.search(r"\bmake\b", r)]
    assert any(re.search(r"\bmake\b[^&|;]*\binstall-runtime\b", r) for r in makes), makes
    assert not any(re.search(r"\bmake\b[^&|;]*\binstall(\s|$)", r) for r in makes), makes
    args = dict(re.findall(r"^(\w+)=(\S+)", rest)[0] for word, rest in stages()[target]
                if word == "ARG" and "=" in rest)
    spec = re.search(r"TORCH_SPEC=\"?([^\s\"]+)", " ".join(makes))
    torch = spec.group(1) if spec else "torch==2.13.0"  # the Makefile's default
    torch = args.get(torch[1:], torch) if torch.startswith("$") else torch
    assert "==" in torch, f"{target}: torch is not pinned ({torch}): the locks hold its dependencies for one version"
