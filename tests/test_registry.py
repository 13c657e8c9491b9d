"""Adapter registry: atomic versions, explicit active pointer, rollback."""

import json

import pytest

from train import registry


def make_version(persona="teto", marker="x"):
    staging = registry.staging_dir(persona)
    (staging / "adapter_config.json").write_text(json.dumps({"marker": marker}))
    return registry.commit(persona, staging, {"kind": "sft"})


def test_versions_count_up_and_are_never_reused(persona_home):
    v1, v2 = make_version(), make_version()
    assert (v1.version, v2.version) == (1, 2) and v2.name == "teto-v2"
    assert json.loads((v2.path / "meta.json").read_text())["version"] == 2
    registry.set_active("teto", 2)
    registry.discard(v2.path)  # deleted from disk, but it was served once
    assert make_version().version == 3


def test_staging_folders_are_invisible_and_discarded():
    staging = registry.staging_dir("teto")
    (staging / "half-written").write_text("...")
    assert registry.versions("teto") == []
    registry.discard(staging)
    assert not staging.exists()


def test_newest_folder_is_not_active_until_promoted():
    make_version()
    assert registry.active("teto") is None
    registry.set_active("teto", 1)
    make_version()
    assert registry.active("teto").version == 1
    registry.set_active("teto", 2)
    assert registry.active("teto").version == 2


def test_rollback_walks_back_through_history():
    for _ in range(3):
        make_version()
    for v in (1, 2, 3):
        registry.set_active("teto", v)
    assert registry.rollback("teto").version == 2
    assert registry.active("teto").version == 2
    assert registry.rollback("teto").version == 1
    with pytest.raises(registry.RegistryError, match="no earlier version"):
        registry.rollback("teto")


def test_errors_are_clear(persona_home):
    with pytest.raises(registry.RegistryError, match="no active adapter"):
        registry.rollback("egen")
    with pytest.raises(registry.RegistryError, match=r"teto has no adapter v9 \(versions: none\)"):
        registry.set_active("teto", 9)
    make_version()
    registry.set_active("teto", 1)
    (persona_home / "adapters" / "active.json").write_text("{broken")
    with pytest.raises(registry.RegistryError, match="active.json is corrupt"):
        registry.active("teto")


def test_candidate_is_kept_until_promoted_or_cleared():
    for _ in range(3):
        make_version()
    with pytest.raises(registry.RegistryError, match="no active adapter"):
        registry.set_candidate("teto", 2)
    registry.set_active("teto", 1)
    with pytest.raises(registry.RegistryError, match="is the active version"):
        registry.set_candidate("teto", 1)
    registry.set_candidate("teto", 2)
    registry.set_active("teto", 3)                     # another promotion keeps the candidate
    assert registry.candidate("teto").version == 2
    registry.set_active("teto", 2)                     # promoting the candidate ends its test
    assert registry.candidate("teto") is None
    registry.set_candidate("teto", 3)
    registry.set_candidate("teto", None)
    assert registry.candidate("teto") is None


def test_candidate_command_without_a_gateway(persona_home):
    import subprocess
    import sys

    make_version()
    make_version()
    registry.set_active("teto", 1)
    result = subprocess.run([sys.executable, "-m", "serve.cli", "adapters", "candidate", "--persona", "teto",
                             "--version", "2", "--gateway", "http://127.0.0.1:9"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "teto-v2 is the candidate" in result.stdout and "no gateway" in result.stdout
    assert registry.candidate("teto").version == 2
