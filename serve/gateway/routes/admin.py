"""Admin routes: they need an admin key (an API key is a 403), checked for the whole router.

    POST /v1/load_lora_adapter    vLLM's payload, sent to every engine replica (adapters folder only)
    POST /v1/unload_lora_adapter
    POST /admin/reload            re-read the adapter registry and hot-swap active versions
    POST /admin/snapshot          export the store as Parquet; answers {"path": folder}
    POST /admin/runs              record a training run (the loop's runs report here)
    GET  /admin/runs              recent training runs (?persona=, ?limit=)
    POST /admin/retrain           start a retrain of a persona now ({"persona", "force", "promotion"})
    POST /admin/experiments       start an A/B experiment ({"persona", "challenger", "run_id", "share",
                                  "min_votes", "alpha", "max_hours"}); answers its row
    GET  /admin/experiments       experiments, newest first, with their figures (?persona=, ?limit=)
    POST /admin/experiments/{id}/stop   stop a running one: its challenger is retired
    GET  /admin/engines           replicas, health, requests in flight
    GET  /metrics                 Prometheus text format
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response

from serve.gateway.openapi import body as documented
from serve.gateway.routes.deps import admin_client, gateway_of, json_body
from serve.protocol import (EmptyRequest, ExperimentRequest, LoadLoRAAdapterRequest, RetrainRequest, RunRecord,
                            UnloadLoRAAdapterRequest)

router = APIRouter(dependencies=[Depends(admin_client)])
# An action without arguments still reads its body: nothing or {} (anything else is a 400).
NO_ARGUMENTS = {"openapi_extra": documented(EmptyRequest, required=False),
                "dependencies": [json_body(EmptyRequest, optional=True)]}


@router.post("/v1/load_lora_adapter", openapi_extra=documented(LoadLoRAAdapterRequest))
async def load_lora(request: Request, body: Annotated[LoadLoRAAdapterRequest, json_body(LoadLoRAAdapterRequest)]):
    return PlainTextResponse(await gateway_of(request).load_adapter(body))


@router.post("/v1/unload_lora_adapter", openapi_extra=documented(UnloadLoRAAdapterRequest))
async def unload_lora(request: Request,
                      body: Annotated[UnloadLoRAAdapterRequest, json_body(UnloadLoRAAdapterRequest)]):
    return PlainTextResponse(await gateway_of(request).unload_adapter(body))


@router.post("/admin/reload", **NO_ARGUMENTS)
async def reload(request: Request):
    return {"active": await gateway_of(request).reload()}


@router.post("/admin/snapshot", **NO_ARGUMENTS)
async def snapshot(request: Request):
    return {"path": await asyncio.to_thread(gateway_of(request).snapshot)}


@router.post("/admin/runs", openapi_extra=documented(RunRecord))
async def record_run(request: Request, body: Annotated[RunRecord, json_body(RunRecord)]):
    await asyncio.to_thread(gateway_of(request).store.record_run, body.model_dump(exclude_none=True))
    return {"id": body.id, "status": body.status}


@router.get("/admin/runs")
async def runs(request: Request, persona: str | None = None, limit: int = 20):
    return {"runs": await asyncio.to_thread(gateway_of(request).store.recent_runs, persona, limit)}


@router.post("/admin/retrain", openapi_extra=documented(RetrainRequest))
async def retrain(request: Request, body: Annotated[RetrainRequest, json_body(RetrainRequest)]):
    return gateway_of(request).retrain(body.persona, body.force, body.promotion)


@router.post("/admin/experiments", openapi_extra=documented(ExperimentRequest))
async def start_experiment(request: Request, body: Annotated[ExperimentRequest, json_body(ExperimentRequest)]):
    return await gateway_of(request).experiments.start(body)


@router.get("/admin/experiments")
async def experiments(request: Request, persona: str | None = None, limit: int = 20):
    return {"experiments": await asyncio.to_thread(gateway_of(request).experiments.recent, persona, limit)}


@router.post("/admin/experiments/{experiment_id}/stop", **NO_ARGUMENTS)
async def stop_experiment(request: Request, experiment_id: str):
    return await gateway_of(request).experiments.stop(experiment_id)


@router.get("/admin/engines")
async def engines(request: Request):
    return {"engines": gateway_of(request).pool.describe()}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(gateway_of(request).metrics.render(), media_type="text/plain; version=0.0.4")
