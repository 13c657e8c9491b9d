"""What a LoRA adapter folder declares (``adapter_config.json``), read one way for both
engines: the embedded engine checks a folder before loading it, and the vLLM launcher
sizes ``--max-lora-rank`` to the adapters it will serve."""

from __future__ import annotations

import json
from pathlib import Path


def read_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))


def rank(config: dict) -> int:
    """The largest rank an adapter declares: ``r`` (peft's default 8) or one in ``rank_pattern``."""
    return max([int(config.get("r", 8))] + [int(r) for r in (config.get("rank_pattern") or {}).values()])


def adapter_problem(folder: Path, max_rank: int) -> str | None:
    """Why an adapter folder cannot be loaded, found before touching the model (or None)."""
    try:
        config = read_config(folder)
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read adapter_config.json ({exc})"
    except json.JSONDecodeError as exc:
        return f"adapter_config.json is not valid JSON (line {exc.lineno}: {exc.msg})"
    if not isinstance(config, dict):
        return "adapter_config.json is not a JSON object"
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config.get('peft_type')!r} is not LORA"
    if config.get("use_dora"):
        return "DoRA adapters are not supported"
    try:
        largest = rank(config)
    except (TypeError, ValueError):
        return f"rank r={config.get('r')!r} is not a number"
    if largest > max_rank:
        return f"rank {largest} is above this engine's --max-lora-rank {max_rank}"
    weights = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).is_file()]
    if not weights:
        return "no adapter_model.safetensors in the folder"
    return None
