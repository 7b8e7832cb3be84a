"""POST /v1/embeddings: OpenAI's embeddings API on the served decoder model.

Each input becomes one engine request with SamplingParams.pooling="default": the engine computes the
prompt alone (batched with every other request by the same scheduler), pools its final hidden states
as the engine's `pooling` option says (`--pooling last|mean`) and L2-normalizes the result.
"""

from __future__ import annotations

import base64
import struct

from fastapi import Request
from fastapi.responses import JSONResponse

from sutra.errors import InvalidRequestError
from sutra.sampling_params import SamplingParams
from sutra.server.common import (
    ServerState,
    Submitted,
    abort_on_disconnect,
    estimate_headers,
    merged_deltas,
    new_id,
    submit_all,
)
from sutra.server.protocol import EmbeddingRequest
from sutra.server.served_model import ServedModel


async def create_embedding(state: ServerState, body: EmbeddingRequest, http_request: Request) -> JSONResponse:
    state.check_request(body)  # type: ignore[arg-type]  # the model, refused fields, Unicode text
    inputs = body.inputs()
    limits = state.limits
    # Each input is one request in the waiting queue, as each prompt of a completions batch is.
    if len(inputs) > limits.max_prompts_per_batch:
        raise InvalidRequestError(
            f"input: at most {limits.max_prompts_per_batch} inputs in one request are allowed, got {len(inputs)}",
            param="input",
        )
    if len(body.user or "") > limits.max_user_chars:
        raise InvalidRequestError(
            f"user: at most {limits.max_user_chars} characters in user are allowed, got {len(body.user or '')}",
            param="user",
        )
    served = await state.model_for(body.model, http_request)
    engine = served.engine
    prompts = [p if isinstance(p, list) else await engine.encode(p) for p in inputs]

    def make_params(_: int) -> SamplingParams:
        return SamplingParams(pooling="default", max_tokens=1, dimensions=body.dimensions)

    request_id = new_id("embd")
    try:
        submitted = await submit_all(
            served,
            request_id,
            prompts,
            make_params,
            state.spec_of(http_request, body),  # type: ignore[arg-type]
        )
    except InvalidRequestError as e:
        if e.param != "prompt":
            raise
        raise InvalidRequestError(str(e), param="input") from e  # the engine's name for an input
    headers = await estimate_headers(served, submitted)
    embeddings = await _collect(served, http_request, submitted)
    num_tokens = sum(len(p) for p in prompts)  # nothing is generated: the prompts are the total
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encoded(vector, body.encoding_format)}
                for i, vector in enumerate(embeddings)
            ],
            "model": served.name,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
        },
        headers=headers,
    )


async def _collect(
    served: ServedModel, http_request: Request, submitted: list[Submitted]
) -> list[list[float]]:
    """Each request's embedding, in input order (a client that leaves aborts the rest)."""
    found: dict[str, list[float]] = {}
    async with abort_on_disconnect(http_request, served.engine, [s.request_id for s in submitted]):
        async for sub, delta in merged_deltas(served.engine, submitted):
            if delta.embedding is not None:
                found[sub.request_id] = delta.embedding
    missing = [s.request_id for s in submitted if s.request_id not in found]
    if missing:  # a request that fails raises from its stream; one that ends without a vector is a fault
        raise RuntimeError(f"request {missing[0]} finished without an embedding")
    return [found[s.request_id] for s in submitted]


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    """OpenAI's base64 format: the float32 values' little-endian bytes, base64-encoded."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector
