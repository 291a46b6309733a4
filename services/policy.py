"""One exported policy answering OpenAI-style chat requests with objective weights per request.

No HTTP and no Ray here: `services/api.py` puts this behind FastAPI, `services/deployment.py`
behind Ray Serve. The weight line is written from the policy card (`moalign.json`) by the same
function training used, and tokenised the same way.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moalign.conditioning import WeightsError, render_prompt_ids, round_weights
from moalign.export_folder import PolicyCard


class RequestError(ValueError):
    """A request the service refuses; `status` is the HTTP code, `param` the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[dict[str, Any]]) -> str:
        if isinstance(v, str):
            return v
        parts = []
        for part in v:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat completion request this service honours, plus `objective_weights`.
    Fields it does not know are ignored (clients send many); fields it knows but cannot honour are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    objective_weights: dict[str, float] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    return_token_ids: bool = False
    """Also answer with the prompt's and the completion's token ids (what the model read and wrote)."""

    @model_validator(mode="after")
    def _ends_with_user(self) -> ChatRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's: the weights apply to the answer to it")
        return self


class Engine(Protocol):
    max_model_len: int

    def generate(
        self, prompt_ids: list[int], *, max_tokens: int, temperature: float, top_p: float, seed: int | None, stop: list[str]
    ) -> AsyncIterator[Any]: ...


class PolicyService:
    """Validate a request, write its weight line, run it on the engine, shape the answer."""

    def __init__(
        self, card: PolicyCard, tokenizer: Any, engine: Engine, model_name: str, *, max_tokens_limit: int, default_max_tokens: int
    ):
        self.card = card
        self.tokenizer = tokenizer
        self.engine = engine
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.default_max_tokens = min(default_max_tokens, max_tokens_limit)

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "moalign",
                    "objectives": self.card.objectives,
                    "default_weights": dict(zip(self.card.objectives, self.card.default_weights)),
                }
            ],
        }

    def parse(self, body: bytes) -> ChatRequest:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"the body is not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(payload).__name__}")
        try:
            request = ChatRequest.model_validate(payload)
        except ValueError as exc:
            errors = getattr(exc, "errors", list)()
            where = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
            message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors) or str(exc)
            raise RequestError(422, message, where) from None
        if request.model is not None and request.model != self.model_name:
            raise RequestError(404, f"model {request.model!r} is not served here; this service serves {self.model_name!r}", "model")
        return request

    def prepare(self, request: ChatRequest) -> tuple[list[int], dict[str, Any], dict[str, float]]:
        """Token ids of the conditioned prompt, the sampling settings and the weights as written."""
        try:
            weights = self.card.weights(request.objective_weights)
        except WeightsError as exc:
            raise RequestError(422, f"objective_weights: {exc}", "objective_weights") from None
        max_tokens = request.max_completion_tokens or request.max_tokens or self.default_max_tokens
        if max_tokens > self.max_tokens_limit:
            raise RequestError(422, f"max_tokens: {max_tokens} is above this service's limit of {self.max_tokens_limit}", "max_tokens")
        messages = self.card.condition([m.model_dump() for m in request.messages], weights)
        prompt_ids = render_prompt_ids(self.tokenizer, messages)
        if len(prompt_ids) + max_tokens > self.engine.max_model_len:
            raise RequestError(
                422,
                f"messages: the conditioned prompt is {len(prompt_ids)} tokens; with max_tokens={max_tokens} it exceeds "
                f"the context of {self.engine.max_model_len}",
                "messages",
            )
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        sampling = {
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "stop": stop,
        }
        written = round_weights(weights, self.card.decimals)
        return prompt_ids, sampling, dict(zip(self.card.objectives, written.tolist()))

    def render(self, request: ChatRequest) -> dict[str, Any]:
        """The conditioned prompt as text and the weights as written, without generating."""
        prompt_ids, _, written = self.prepare(request)
        return {"prompt": self.tokenizer.decode(prompt_ids), "objective_weights": written}

    async def complete(self, request: ChatRequest) -> dict[str, Any]:
        prompt_ids, sampling, written = self.prepare(request)
        text: list[str] = []
        tokens: list[int] = []
        finish = None
        async with contextlib.aclosing(self.engine.generate(prompt_ids, **sampling)) as deltas:
            async for delta in deltas:
                text.append(delta.text)
                tokens += delta.token_ids
                finish = delta.finish_reason or finish
        answer = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": _finish(finish)}],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens), "total_tokens": len(prompt_ids) + len(tokens)},
            "objective_weights": written,
        }
        if request.return_token_ids:
            answer["prompt_token_ids"] = prompt_ids
            answer["choices"][0]["token_ids"] = tokens
        return answer

    async def stream(self, request: ChatRequest) -> AsyncIterator[str]:
        """Server-sent events as OpenAI streams them: a role chunk, content chunks, a finish chunk, [DONE].
        Validation happens before the first event, so a bad request is an HTTP error, not a broken stream."""
        prompt_ids, sampling, written = self.prepare(request)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model_name,
        }

        async def events() -> AsyncIterator[str]:
            yield _sse(
                {
                    **base,
                    "objective_weights": written,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                }
            )
            # aclosing: a client that left closes the engine's generator now, not whenever it is collected.
            async with contextlib.aclosing(self.engine.generate(prompt_ids, **sampling)) as deltas:
                async for delta in deltas:
                    if delta.text:
                        yield _sse({**base, "choices": [{"index": 0, "delta": {"content": delta.text}, "finish_reason": None}]})
                    if delta.finish_reason is not None:
                        yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": _finish(delta.finish_reason)}]})
            yield "data: [DONE]\n\n"

        return events()


def _finish(reason: str | None) -> str:
    # vLLM says "stop" for EOS and stop strings, "length" at max_tokens, "abort" when cut off.
    return reason if reason in ("stop", "length") else (reason or "stop")


def _sse(payload: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
