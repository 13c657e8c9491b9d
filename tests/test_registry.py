"""Adapter registry: atomic versions, explicit active pointer, rollback, version statuses,
durable pointer writes, and promotions a killed process left in progress."""

import json
import os
import stat
import struct
import subprocess
import sys

import pytest

from train import registry


def make_version(persona="teto", marker="x"):
    staging = registry.staging_dir(persona)
    (staging / "adapter_config.json").write_text(json.dumps({"marker": marker}))
    header = b'{"__metadata__":{}}'  # a whole safetensors file with no tensors
    (staging / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
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


def test_statuses_of_versions():
    for _ in range(4):
        make_version()
    registry.set_active("teto", 1)
    registry.set_active("teto", 3)
    registry.set_candidate("teto", 2)
    assert [registry.status("teto", v) for v in (3, 2, 4)] == [("active", None), ("candidate", None),
                                                                ("available", None)]
    registry.mark_rejected("teto", 4, "reward accuracy 0.40 < 0.55")
    registry.retire("teto", 2, "replaced")
    assert registry.status("teto", 4) == ("rejected", "reward accuracy 0.40 < 0.55")
    assert registry.status("teto", 2) == ("retired", "replaced") and registry.candidate("teto") is None
    with pytest.raises(registry.RegistryError, match="v3 is the active version"):
        registry.retire("teto", 3, "no")
    with pytest.raises(registry.RegistryError, match=r"no adapter v9"):
        registry.status("teto", 9)
    registry.retire("teto", 1, "too old")
    with pytest.raises(registry.RegistryError, match="no earlier version"):
        registry.rollback("teto")                       # v1, retired, is no rollback target
    registry.set_active("teto", 4, reason="manual promote")  # an explicit promotion lifts a mark
    assert registry.status("teto", 4) == ("active", None)
    assert registry.rollback("teto").version == 3


def test_pointer_write_is_durable(monkeypatch):
    make_version()
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync-dir" if stat.S_ISDIR(info.st_mode) else "fsync-file", info.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("replace", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    registry.set_active("teto", 1)
    pointer = registry.root() / "active.json"
    assert [e[0] for e in events] == ["fsync-file", "replace", "fsync-dir"]
    assert events[1][1] == str(pointer) and events[2][1] == registry.root().stat().st_ino
    assert events[0][1] == pointer.stat().st_ino     # the file that was renamed into place


def marker():
    return registry._read_pointers()["teto"].get("promoting")


def test_promotion_is_marked_until_it_ends():
    for _ in range(3):
        make_version()
    registry.set_active("teto", 1)
    with registry.promotion("teto", 2, "r1") as promotion:
        assert promotion.previous == 1 and registry.active("teto").version == 2
        assert {k: marker()[k] for k in ("version", "previous", "run")} == {"version": 2, "previous": 1, "run": "r1"}
        assert marker()["started_at"] and str(os.getpid()) in marker()["owner"]
        with pytest.raises(registry.RegistryError, match="another promotion is under way.*still promoting v2"):
            with registry.promotion("teto", 3, "r2"):
                pass
    assert marker() is None and registry.active("teto").version == 2
    with pytest.raises(ZeroDivisionError):
        with registry.promotion("teto", 3, "r3"):
            1 / 0
    assert marker() is None and registry.active("teto").version == 2      # an error inside puts v2 back
    with registry.promotion("teto", 3, "r4") as promotion:
        promotion.undo("an engine refused it")
    assert registry.active("teto").version == 2 and registry.status("teto", 3) == ("rejected", "an engine refused it")


def test_loop_promotion_marks_the_pointer_while_the_gateway_reloads():
    from train import loop

    make_version()
    make_version()
    registry.set_active("teto", 1)
    seen, recorded = [], []

    class Gateway:
        def reload(self):
            seen.append((registry.active("teto").version, marker()["version"], marker()["run"]))
            return {"teto": "teto-v2"}

        def record_run(self, run):
            recorded.append(run["status"])

    run = loop._promote({"id": "r1", "persona": "teto"}, Gateway(), None, "teto", 2, 1)
    assert seen == [(2, 2, "r1")] and run["status"] == recorded[-1] == "promoted"
    assert marker() is None and registry.status("teto", 2) == ("active", None)


def crash_while_promoting(version: int, run: str = "r9") -> None:
    """A process that moves the pointer with the promotion marker, then dies (no cleanup)."""
    code = (f"import os; from train import registry; held = registry.promotion('teto', {version}, {run!r}); "
            "held.__enter__(); os._exit(1)")
    assert subprocess.run([sys.executable, "-c", code], env=os.environ.copy()).returncode == 1
    assert marker()["version"] == version


def test_persona_up_keeps_a_complete_version_a_dead_process_was_promoting():
    from serve import cli_up

    make_version()
    make_version()
    registry.set_active("teto", 1)
    crash_while_promoting(2)
    cli_up.reconcile_registry()                          # what `persona up` does before serving
    assert marker() is None and cli_up.load_catalog().personas["teto"].active == 2
    assert registry.reconcile() == []                    # nothing left to settle


def test_persona_up_undoes_the_promotion_of_an_incomplete_version():
    from serve import cli_up

    make_version()
    v2 = make_version()
    registry.set_active("teto", 1)
    crash_while_promoting(2)
    (v2.path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # truncated
    cli_up.reconcile_registry()
    assert marker() is None and cli_up.load_catalog().personas["teto"].active == 1
    state, reason = registry.status("teto", 2)
    assert state == "rejected" and "r9 was interrupted" in reason


def test_reconcile_leaves_a_live_promotion_alone():
    make_version()
    make_version()
    registry.set_active("teto", 1)
    with registry.promotion("teto", 2, "live"):
        (note,) = registry.reconcile("teto")
        assert "still promoting v2; left alone" in note and marker()["run"] == "live"
    assert marker() is None and registry.active("teto").version == 2
