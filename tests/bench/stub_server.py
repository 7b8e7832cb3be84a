"""A tiny OpenAI-style streaming server with fixed timing: the client's behavior without a model."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class StubServer:
    first_token_delay: float = 0.02
    token_delay: float = 0.005
    send_usage: bool = True
    prompt_tokens: int = 7  # what the usage block reports, whatever the prompt
    models: list[str] = field(default_factory=lambda: ["stub-model"])
    end_stream_early: bool = False  # close after the tokens, with neither a finish reason nor [DONE]
    payloads: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m} for m in self.models]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.payloads.append(payload)
        self.auth_headers.append(request.headers.get("Authorization"))
        chat = "messages" in payload
        prompt = json.dumps(payload["messages"]) if chat else payload["prompt"]
        if "FAIL" in prompt:
            return web.json_response({"error": {"message": "refused"}}, status=500)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._stream(request, payload, chat)
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, payload: dict[str, Any], chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(event: Any) -> None:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())

        def choice(text: str, finish: str | None = None) -> dict[str, Any]:
            body = {"delta": {"content": text} if text else {}} if chat else {"text": text}
            return {"choices": [{"index": 0, **body, "finish_reason": finish}]}

        if chat:  # the role-only first chunk chat servers send before any token
            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(self.first_token_delay)
        n = payload.get("max_tokens", 3)
        for i in range(n):
            if i:
                await asyncio.sleep(self.token_delay)
            await send(choice(f" t{i}"))
        if self.end_stream_early:
            return response
        await send(choice("", finish="length"))
        if self.send_usage:
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": n}
            await send({"choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
