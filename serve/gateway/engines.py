"""The gateway's client for its engines: one or several replicas speaking vLLM's protocol.

Requests go to the healthy replica with the fewest requests in flight. A
replica that refuses the connection is marked down and the request is tried
on the next one (only before any byte was sent back, so nothing is
duplicated). Adapters are loaded onto every replica; a replica that comes
back up gets them again on the next health check.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx

from feedback.errors import APIError

log = logging.getLogger(__name__)


def parse_error(status: int, body: bytes) -> APIError:
    """An engine's error body as the caller's error, with the engine's status, message and
    param: OpenAI's ``{"error": {...}}`` or vLLM's flat ``{"message", ...}``. The type is
    OpenAI's for the status, not the engine's vLLM-style one (``BadRequestError``)."""
    try:
        data = json.loads(body)
    except ValueError:
        return APIError(status, body.decode(errors="replace")[:500] or f"engine answered HTTP {status}")
    if isinstance(data, dict):
        inner = data.get("error") if isinstance(data.get("error"), dict) else data
        message = inner.get("message") or inner.get("detail") or json.dumps(data)[:500]
        return APIError(status, str(message), inner.get("param"))
    return APIError(status, str(data)[:500])


@dataclass
class Replica:
    url: str
    healthy: bool = True
    in_flight: int = 0
    loaded: set[str] = field(default_factory=set)  # adapter names this gateway loaded there
    served: int = 0


KEEPALIVE_SECONDS = 2.0


class EnginePool:
    def __init__(self, urls: list[str], api_key: str | None = None, timeout: float = 600.0):
        if not urls:
            raise ValueError("at least one engine URL is needed")
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Idle connections are dropped after 2 s, before any engine's server drops them (uvicorn's
        # and vLLM's keep-alive is 5 s): a request sent on a connection the server is closing at
        # that moment fails with a ReadError (seen under steady load: one chat in a run of about 1,500 got 503).
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=KEEPALIVE_SECONDS)
        self.http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout, connect=5.0), limits=limits)
        self._adapter_locks: dict[str, asyncio.Lock] = {}
        self.wanted: dict[str, str] = {}  # adapter name -> path, kept loaded on every replica
        self.restart: dict[str, Callable[[], bool]] = {}  # url -> starts that engine again if it died

    async def close(self) -> None:
        await self.http.aclose()

    # ---- health ------------------------------------------------------------------------
    async def check(self) -> list[Replica]:
        async def one(r: Replica):
            try:
                ok = (await self.http.get(r.url + "/health", timeout=5.0)).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok and not r.healthy:
                log.info("engine %s is back", r.url)
                r.loaded.clear()  # it may have restarted without our adapters
            if not ok and r.healthy:
                log.warning("engine %s is down", r.url)
            r.healthy = ok

        await asyncio.gather(*(one(r) for r in self.replicas))
        for r in self.replicas:
            hook = self.restart.get(r.url)
            if not r.healthy and hook and await asyncio.to_thread(hook):
                log.warning("engine %s had exited: started it again", r.url)
        if any(r.healthy for r in self.replicas):
            await self.sync_adapters()
        return self.replicas

    async def wait_healthy(self, timeout: float) -> None:
        """Return once at least one replica answers /health (the others join when they do)."""
        deadline = time.monotonic() + timeout
        while True:
            await self.check()
            if any(r.healthy for r in self.replicas):
                down = [r.url for r in self.replicas if not r.healthy]
                if down:
                    log.warning("starting with engine(s) down: %s", ", ".join(down))
                return
            if time.monotonic() > deadline:
                urls = ", ".join(r.url for r in self.replicas)
                raise TimeoutError(f"no engine became healthy within {timeout:.0f} s: {urls}")
            await asyncio.sleep(0.5)

    def health(self) -> dict:
        """What /health answers: ``ok`` while at least one replica is up."""
        up = sum(r.healthy for r in self.replicas)
        return {"status": "ok" if up else "unavailable", "engines_up": up, "engines": len(self.replicas)}

    def describe(self) -> list[dict]:
        """Each replica as /admin/engines shows it: health, requests in flight, adapters."""
        return [{"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight, "served": r.served,
                 "adapters": sorted(r.loaded)} for r in self.replicas]

    def pick(self, exclude: set[str] = frozenset()) -> Replica:
        up = [r for r in self.replicas if r.healthy and r.url not in exclude]
        if not up:
            raise APIError(503, "No engine is available right now; try again shortly.")
        return min(up, key=lambda r: (r.in_flight, r.served))

    # ---- adapters ----------------------------------------------------------------------
    async def _post(self, replica: Replica, route: str, body: dict) -> httpx.Response:
        return await self.http.post(replica.url + route, json=body)

    async def ensure_loaded(self, name: str, path: str) -> None:
        """Load an adapter on every healthy replica that does not have it yet."""
        lock = self._adapter_locks.setdefault(name, asyncio.Lock())
        async with lock:
            done = []
            for r in self.replicas:
                if not r.healthy or name in r.loaded:
                    continue
                resp = await self._post(r, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
                if resp.status_code == 200 or (resp.status_code == 400 and "already" in resp.text):
                    r.loaded.add(name)
                    done.append(r)
                    log.info("adapter %s loaded on %s", name, r.url)
                    continue
                # Refused: take it off the replicas that took it, so all of them stay alike.
                for other in done:
                    await self._post(other, "/v1/unload_lora_adapter", {"lora_name": name})
                    other.loaded.discard(name)
                raise parse_error(resp.status_code, resp.content)
            self.wanted[name] = path

    async def unload(self, name: str) -> None:
        """Unload an adapter from every replica, under the adapter's lock: a request that needs
        it meanwhile (a pinned version's, one retried after the engine said 404 while it was
        unloading) loads it again only once the unload is done, instead of being told "already
        loaded" by an engine that is about to drop it."""
        lock = self._adapter_locks.setdefault(name, asyncio.Lock())
        async with lock:
            self.wanted.pop(name, None)
            for r in self.replicas:
                r.loaded.discard(name)  # first: from here on a request loads it again (after this)
                if r.healthy:
                    resp = await self._post(r, "/v1/unload_lora_adapter", {"lora_name": name})
                    if resp.status_code not in (200, 404):
                        raise parse_error(resp.status_code, resp.content)

    async def sync_adapters(self) -> None:
        for name, path in list(self.wanted.items()):
            try:
                await self.ensure_loaded(name, path)
            except (APIError, httpx.HTTPError) as exc:
                log.warning("could not load adapter %s: %s", name, exc)

    async def broadcast(self, route: str, body: dict) -> httpx.Response:
        """Send an admin request to every healthy replica; the first non-200 answer wins."""
        last = None
        for r in self.replicas:
            if r.healthy:
                last = await self._post(r, route, body)
                if last.status_code != 200:
                    return last
        if last is None:
            raise APIError(503, "No engine is available right now.")
        return last

    # ---- chat --------------------------------------------------------------------------
    async def post_chat(self, body: dict) -> tuple[Replica, httpx.Response]:
        """Send a chat request; returns the replica and the open (streamed) response.

        Connection failures move on to the next replica. The caller must call
        ``finish(replica, response)``.
        """
        tried: set[str] = set()
        while True:
            replica = self.pick(tried)
            replica.in_flight += 1
            try:
                request = self.http.build_request("POST", replica.url + "/v1/chat/completions", json=body)
                response = await self.http.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                replica.in_flight -= 1
                replica.healthy = False
                tried.add(replica.url)
                log.warning("engine %s failed (%s); trying another", replica.url, type(exc).__name__)
                continue
            except BaseException:
                replica.in_flight -= 1
                raise
            replica.served += 1
            if response.status_code != 200:
                content = await response.aread()
                await self.finish(replica, response)
                raise parse_error(response.status_code, content)
            return replica, response

    async def finish(self, replica: Replica, response: httpx.Response) -> None:
        replica.in_flight -= 1
        await response.aclose()
