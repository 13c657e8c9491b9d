"""Request bodies in the gateway's OpenAPI schema (``GET /openapi.json``).

The routes read their JSON by hand (``read_json``: a size limit while reading,
errors in OpenAI's shape), so FastAPI cannot see their models. Each POST route
names its model instead:

    @app.post("/v1/feedback", openapi_extra=body(FeedbackRequest))

The model's schema is inlined (its ``$defs`` resolved in place), so the route's
entry is complete on its own and nothing has to be added to the components.
"""

from __future__ import annotations

from pydantic import BaseModel


def _inline(node, defs: dict):
    # The protocol's models are not recursive, so resolving every $ref ends.
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {key: _inline(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(value, defs) for value in node]
    return node


def schema_of(model: type[BaseModel]) -> dict:
    """``model``'s JSON schema (as a request body) with no ``$ref`` left in it."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    return _inline(schema, defs)


def body(model: type[BaseModel], required: bool = True) -> dict:
    """``openapi_extra`` for a route whose JSON body is ``model``."""
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema_of(model)}}}}
