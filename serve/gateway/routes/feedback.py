"""Feedback on served turns, from API clients (the UI's votes take the same paths).

    POST /v1/feedback             thumbs up/down (or retract) on a turn served to the caller
    POST /v1/comparisons          which of two answers to the same context is better

Both count against the key's vote quota (``quota.py``): past it, a 429 with Retry-After.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request

from feedback.votes import Vote
from serve.gateway.openapi import body as documented
from serve.gateway.routes.deps import ApiClient, gateway_of, json_body
from serve.protocol import ComparisonRequest, FeedbackRequest

router = APIRouter()


@router.post("/v1/feedback", openapi_extra=documented(FeedbackRequest))
async def feedback(request: Request, client: ApiClient, body: Annotated[FeedbackRequest, json_body(FeedbackRequest)]):
    vote = Vote(body.turn_id, body.vote, client, body.choice_index, body.reason, body.comment)
    status = await gateway_of(request).vote(vote, voter=client)
    return {"object": "feedback", "turn_id": body.turn_id, "choice_index": body.choice_index, "vote": body.vote,
            "status": status}


@router.post("/v1/comparisons", openapi_extra=documented(ComparisonRequest))
async def comparisons(request: Request, client: ApiClient,
                      body: Annotated[ComparisonRequest, json_body(ComparisonRequest)]):
    comparison_id = await gateway_of(request).compare(body.turn_a, body.turn_b, body.choice, body.left, client)
    return {"object": "comparison", "id": comparison_id, "choice": body.choice}
