"""Local servers: free loopback ports, an ASGI app in a thread, ``persona ...`` in a child process.

Used by ``persona up`` (the engine it starts), the benchmarks and the tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from feedback.errors import UserError


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url_of(host: str, port: int) -> str:
    """The URL at which this host reaches a server bound to ``host:port``: a wildcard bind
    (0.0.0.0, ::) is reached on loopback, any other address as it is (a server bound to
    one address does not answer on 127.0.0.1)."""
    import ipaddress

    host = host.strip().strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"  # a name
    return f"http://[{literal}]:{port}" if literal.version == 6 else f"http://{literal}:{port}"


def serve_in_thread(app, **options) -> tuple[str, object]:
    """Serve an ASGI app on a free loopback port from a daemon thread; returns (url, server).
    ``options``: more of uvicorn's (the gateway's ``edge.server_options``)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server on port {port} did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def wait_for(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    """Wait until ``url/health`` answers 200; raise ``RuntimeError`` if ``proc`` exits first
    (with the tail of ``log``, when given) or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            message = f"server exited with code {proc.returncode} while starting"
            said = _user_error(log) if proc.returncode == 2 else None
            if said:  # the child's own one-line message (a UserError there) is the caller's too
                raise UserError(said)
            if log is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                message += f"; log {log}:\n{tail}"
            raise RuntimeError(message)
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not healthy after {timeout:.0f} s" + (f" (log: {log})" if log else ""))


def _user_error(log: Path | None) -> str | None:
    """The one-line message a ``persona`` child printed for a ``UserError`` (``persona: error: ...``)."""
    if log is None or not log.exists():
        return None
    lines = log.read_text(errors="replace")[-4000:].splitlines()
    said = [line for line in lines if line.startswith("persona: error: ")]
    return said[-1].removeprefix("persona: error: ") if said else None


class Supervised:
    """``persona ARGS`` as a child process that can be started again when it dies."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.args, self.log, self.env = args, log, {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "serve.cli", *self.args], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        return self.proc

    def restart_if_dead(self) -> bool:
        """Start the process again if it has exited; True when it did."""
        if self.proc is None or self.proc.poll() is None:
            return False
        self.start()
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class ChildServer:
    """A ``persona ...`` server in a child process: its loopback URL and its supervisor
    (which can start it again)."""

    url: str
    supervisor: Supervised

    @property
    def pid(self) -> int:
        return self.supervisor.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (Linux)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def child_server(args: list[str], port: int, log: Path, env: dict | None = None,
                 timeout: float = 300) -> Iterator[ChildServer]:
    """Run ``persona ARGS`` (a server on ``port``) as a child process; yield it once /health
    answers, and stop it on the way out."""
    supervisor = Supervised(args, log, env)
    proc = supervisor.start()
    try:
        child = ChildServer(f"http://127.0.0.1:{port}", supervisor)
        wait_for(child.url, proc, timeout, log)
        yield child
    finally:
        supervisor.stop()


@contextlib.contextmanager
def persona_process(args: list[str], port: int, log: Path, env: dict | None = None,
                    timeout: float = 300) -> Iterator[str]:
    """``child_server`` for callers that need only the server's loopback URL."""
    with child_server(args, port, log, env, timeout) as child:
        yield child.url
