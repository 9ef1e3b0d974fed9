"""The OpenAI-compatible HTTP layer (Starlette): /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Requests are validated here (OpenAI-style error objects with the right 4xx; the server keeps serving), tokenized,
sized by `admission.BytePredictor` and handed to the `Scheduler` thread, which streams token ids back through an
asyncio queue. Text is decoded here from all tokens so far, so streamed deltas concatenate to exactly the text a
non-streamed request (and `memfit run`) returns. Decoding is greedy only: a request asking for sampling
(`temperature` > 0, `n` > 1) is refused rather than silently served greedily.

Extra request field: `memfit: {"method": ..., "budget": ..., "params": {...}, "spans": "auto" | "on" | "off"}`
(server defaults otherwise; spans as `memfit run --spans`: auto = keep whole words/numbers for an eviction method
with a budget; admission counts their 2 bytes per held token, layer and KV head). Extra
`usage` fields: `kv_bytes_held` (bytes the request's compressed store held when it finished) and `kv_bytes_full`
(what a full cache would have held for the same tokens), `decode_steps_batched` (decode steps that shared one
forward with other requests) and `decode_steps_alone` (steps in a forward of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from memfit.core.budget import Budget
from memfit.core.method import build_policy
from memfit.core.spans import resolve_spans
from memfit.errors import ConfigError
from memfit.serve.scheduler import Request, Scheduler

MAX_BODY_BYTES = 8 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 404:
            kind = "not_found_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class ServerConfig:
    model_name: str
    method: str = "full"
    budget: str | None = None
    params: dict[str, Any] | None = None
    default_max_tokens: int = 256
    spans: str = "auto"  # auto | on | off (memfit.core.spans), as `memfit run --spans`


@dataclass
class Job:
    """A validated request: what the scheduler needs plus what the response needs."""

    prompt_ids: list[int]
    max_tokens: int
    method: str
    budget: Budget
    params: dict[str, Any]
    stream: bool
    include_usage: bool
    stop: list[str]
    chat: bool
    ignore_eos: bool = False
    spans: bool = False  # keep whole words/numbers (memfit.core.spans)


def create_app(model: Any, tokenizer: Any, scheduler: Scheduler, config: ServerConfig) -> Starlette:
    """The ASGI app. Starts the scheduler thread at startup and stops it at shutdown."""
    eos_cfg = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    eos = frozenset(eos_cfg if isinstance(eos_cfg, list) else [eos_cfg] if eos_cfg is not None else [])
    max_context = scheduler.predictor.shape.max_positions or 1 << 30
    names = {config.model_name, "default"}
    created = int(time.time())

    # -- validation ------------------------------------------------------------------------------------------------
    async def read_body(request: HttpRequest) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def positive_int(body: dict[str, Any], key: str, default: int) -> int:
        value = body.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, f"{key} must be an integer", param=key)
        if value <= 0:
            raise ApiError(400, f"{key} must be at least 1 (got {value})", param=key)
        return value

    def compression(body: dict[str, Any]) -> tuple[str, Budget, dict[str, Any], bool]:
        extra = body.get("memfit")
        if extra is None:
            extra = {}
        if not isinstance(extra, dict):
            raise ApiError(400, 'memfit must be an object: {"method": ..., "budget": ..., "params": {...}}', "memfit")
        unknown = set(extra) - {"method", "budget", "params", "spans"}
        if unknown:
            raise ApiError(400, f"unknown memfit field(s) {sorted(unknown)}: use method, budget, params, spans",
                           "memfit")
        method = extra.get("method", config.method)
        if not isinstance(method, str):
            raise ApiError(400, "memfit.method must be a string such as 'snapkv' or 'snapkv+kivi'", "memfit.method")
        params_in = extra.get("params", config.params if "method" not in extra else {}) or {}
        if not isinstance(params_in, dict) or any(isinstance(v, (dict, list)) for v in params_in.values()):
            raise ApiError(400, "memfit.params must be an object of scalar values", "memfit.params")
        params = {str(k): str(v) for k, v in params_in.items()}  # the same strings `--param` would give
        budget_in = extra.get("budget", config.budget if "method" not in extra else None)
        try:
            budget = Budget.parse(budget_in)
            build_policy(method, budget, params)
        except ConfigError as exc:
            raise ApiError(400, str(exc), param="memfit") from None
        try:  # the server's --spans unless the request says; auto = on for an eviction method with a budget
            spans = resolve_spans(extra.get("spans", config.spans), method, budget_in)
        except ConfigError as exc:
            raise ApiError(400, f"memfit.spans: {exc}", param="memfit.spans") from None
        return method, budget, params, spans

    def encode_chat(messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise ApiError(400, "each message needs a role of system, user or assistant", "messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                    raise ApiError(400, "only text content parts are supported", "messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise ApiError(400, "message content must be a string", "messages")
            clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        if not any(m["content"].strip() for m in clean):
            raise ApiError(400, "the messages are empty", "messages")
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        return list(tokenizer("\n".join(m["content"] for m in clean), add_special_tokens=True)["input_ids"])

    def encode_prompt(prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = int(getattr(model.config, "vocab_size", 0) or 0)
            if vocab and any(t < 0 or t >= vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
            return list(prompt)
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt")
        if not prompt.strip():
            raise ApiError(400, "the prompt is empty", "prompt")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def validate(body: dict[str, Any], chat: bool) -> Job:
        name = body.get("model")
        if name is not None and name not in names:
            raise ApiError(404, f"model {name!r} is not served here; use {config.model_name!r}", "model",
                           "model_not_found")
        if body.get("n", 1) not in (1, None):
            raise ApiError(400, "n must be 1: this server returns one greedy completion", "n")
        temperature = body.get("temperature")
        if temperature is not None and (not isinstance(temperature, (int, float)) or temperature != 0):
            raise ApiError(400, "this server decodes greedily: send temperature 0 or leave it out", "temperature")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", "stream")
        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop) or len(stop) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = positive_int(body, key, config.default_max_tokens if chat else 16)
        method, budget, params, spans = compression(body)
        ids = encode_chat(body.get("messages")) if chat else encode_prompt(body.get("prompt"))
        if len(ids) >= max_context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the model's context is {max_context}", "prompt",
                           "context_length_exceeded")
        if len(ids) + max_tokens > max_context:
            raise ApiError(400, f"{key}={max_tokens} plus the prompt's {len(ids)} tokens exceeds the model's context "
                           f"of {max_context} tokens: ask for at most {max_context - len(ids)}", key,
                           "context_length_exceeded")
        need = scheduler.reserve_for(method, budget, params, len(ids), max_tokens, spans)
        if need > scheduler.kv_memory:
            raise ApiError(400, f"this request needs about {need} bytes of KV cache but the server's --kv-memory is "
                           f"{scheduler.kv_memory}: shorten it, lower max_tokens, or use a smaller budget", None,
                           "kv_memory_exceeded")
        ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: generate max_tokens (load tests)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "ignore_eos must be true or false", "ignore_eos")
        return Job(ids, max_tokens, method, budget, params, stream, include_usage, stop, chat, ignore_eos, spans)

    # -- running a job -------------------------------------------------------------------------------------------
    def submit(job: Job) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the client is gone
                loop.call_soon_threadsafe(queue.put_nowait, event)

        req = Request(job.prompt_ids, job.max_tokens, job.method, job.budget, job.params, sink,
                      eos=frozenset() if job.ignore_eos else eos, spans=job.spans)
        scheduler.submit(req)
        return req, queue

    class Detok:
        """Text so far from all tokens so far; deltas held back while they may be a partial character or stop."""

        def __init__(self, stop: list[str]) -> None:
            self.tokens: list[int] = []
            self.sent = ""
            self.stop = stop
            self.hold = max((len(s) for s in stop), default=1) - 1
            self.stopped = False

        def text(self) -> str:
            return tokenizer.decode(self.tokens, skip_special_tokens=True)

        def feed(self, ids: list[int]) -> str:
            self.tokens.extend(ids)
            text = self.text()
            for s in self.stop:
                cut = text.find(s)
                if cut >= 0:
                    self.stopped = True
                    text = text[:cut]
            if not self.stopped:
                if text.endswith("\ufffd"):  # an unfinished multi-byte character
                    return ""
                text = text[: len(text) - self.hold] if self.hold else text
            if not text.startswith(self.sent) or len(text) <= len(self.sent):
                return ""
            delta, self.sent = text[len(self.sent) :], text
            return delta

        def flush(self) -> str:
            if self.stopped:
                return ""
            text = self.text()
            if not text.startswith(self.sent):
                return ""
            delta, self.sent = text[len(self.sent) :], text
            return delta

    def usage(req: Request, job: Job, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": completion_tokens,
            "total_tokens": len(job.prompt_ids) + completion_tokens,
            "kv_bytes_held": req.kv_bytes_held,
            "kv_bytes_full": req.kv_bytes_full,
            "decode_steps_batched": req.decode_steps_batched,
            "decode_steps_alone": req.decode_steps_alone,
        }

    def choice(job: Job, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if not job.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    async def run_job(http: HttpRequest, job: Job) -> Response:
        rid = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]
        req, queue = submit(job)
        base = {"id": rid, "created": int(time.time()), "model": config.model_name}
        if job.stream:
            return StreamingResponse(stream(http, req, queue, job, base), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        detok = Detok(job.stop)
        finish = None
        try:
            while finish is None:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await http.is_disconnected():
                        return Response(status_code=499)
                    continue
                if kind == "error":
                    raise ApiError(500, value)
                if kind == "tokens":
                    detok.feed(value)
                    if detok.stopped:
                        scheduler.cancel(req)
                        finish = "stop"
                else:
                    finish = value
        finally:
            if req.finished is None:
                scheduler.cancel(req)  # the client went away or stop matched: free the store now
        text = detok.sent if detok.stopped else detok.text()
        body = {**base, "object": "chat.completion" if job.chat else "text_completion"}
        if job.chat:
            body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                                "finish_reason": finish}]
        else:
            body["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
        body["usage"] = usage(req, job, len(detok.tokens))
        return JSONResponse(body)

    async def stream(http: HttpRequest, req: Request, queue: asyncio.Queue, job: Job, base: dict) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if job.chat else "text_completion"
        detok = Detok(job.stop)
        first = True
        finish = None

        def sse(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if job.chat:
                yield sse({**base, "object": obj, "choices": [choice(job, "", None, first=True)]})
                first = False
            while finish is None:
                kind, value = await queue.get()
                if kind == "error":
                    yield sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                    return
                if kind == "tokens":
                    delta = detok.feed(value)
                    if detok.stopped:
                        scheduler.cancel(req)
                        finish = "stop"
                    if delta or not detok.stopped:
                        # one chunk per step, even when the new token adds no text yet (a partial character, a
                        # held-back stop prefix, a dummy model's non-text id): clients time tokens by chunks
                        yield sse({**base, "object": obj, "choices": [choice(job, delta, None, first)]})
                        first = False
                else:
                    finish = value
            rest = detok.flush()
            yield sse({**base, "object": obj, "choices": [choice(job, rest, finish, first)]})
            if job.include_usage:
                yield sse({**base, "object": obj, "choices": [], "usage": usage(req, job, len(detok.tokens))})
            yield "data: [DONE]\n\n"
        finally:
            if req.finished is None:
                scheduler.cancel(req)  # client disconnected mid-stream: the store is freed on the next tick

    # -- endpoints -----------------------------------------------------------------------------------------------
    async def handle(http: HttpRequest, chat: bool) -> Response:
        try:
            body = await read_body(http)
            # off the event loop: the first request with a new method calibrates its byte model (~seconds on CPU)
            job = await asyncio.to_thread(validate, body, chat)
            return await run_job(http, job)
        except ApiError as exc:
            return exc.response()

    async def completions(http: HttpRequest) -> Response:
        return await handle(http, chat=False)

    async def chat_completions(http: HttpRequest) -> Response:
        return await handle(http, chat=True)

    async def models(http: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": created, "owned_by": "memfit"}]})

    async def health(http: HttpRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(http: HttpRequest) -> Response:
        return PlainTextResponse(prometheus_text(scheduler.snapshot()), media_type="text/plain; version=0.0.4")

    async def not_found(http: HttpRequest, exc: Exception) -> Response:
        return ApiError(404, f"no route {http.url.path}").response()

    async def bad_method(http: HttpRequest, exc: Exception) -> Response:
        return ApiError(405, f"{http.method} is not allowed on {http.url.path}").response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: bad_method})
    app.state.scheduler = scheduler
    return app


_METRICS = [
    ("requests_running", "gauge", "running", "Requests admitted (reading their prompt or decoding)."),
    ("requests_waiting", "gauge", "waiting", "Requests queued until their predicted KV bytes fit."),
    ("kv_bytes_held", "gauge", "kv_bytes_held", "Bytes the running requests' compressed KV stores hold now."),
    ("kv_bytes_full", "gauge", "kv_bytes_full", "Bytes full caches would hold for the same tokens."),
    ("kv_bytes_reserved", "gauge", "kv_bytes_reserved", "Bytes counted against --kv-memory (reservations)."),
    ("kv_memory_bytes", "gauge", "kv_memory", "The KV memory pool (--kv-memory)."),
    ("model_weight_bytes", "gauge", "weight_bytes", "Bytes of the model's parameters and buffers."),
    ("tokens_per_second", "gauge", "tokens_per_second", "Generated tokens per second over the last 10 s."),
    ("device_allocated_bytes", "gauge", "device_allocated_bytes",
     "CUDA: bytes of live tensors (weights, KV stores and the tick's transients; 0 on CPU)."),
    ("device_reserved_bytes", "gauge", "device_reserved_bytes",
     "CUDA: bytes the caching allocator holds (allocated + cached free blocks; 0 on CPU)."),
    ("device_peak_allocated_bytes", "gauge", "device_peak_allocated_bytes",
     "CUDA: the most bytes of live tensors since the server started (0 on CPU)."),
    ("requests_total", "counter", "requests_total", "Requests admitted."),
    ("preemptions_total", "counter", "preemptions_total", "Requests re-queued because memory ran over."),
    ("cancelled_total", "counter", "cancelled_total", "Requests whose client went away (store freed)."),
    ("generated_tokens_total", "counter", "tokens_generated_total", "Tokens generated."),
    ("prompt_tokens_total", "counter", "prompt_tokens_total", "Prompt tokens prefilled."),
    ("scheduler_errors_total", "counter", "scheduler_errors_total", "Internal errors that failed requests."),
    ("decode_batch_size", "gauge", "decode_batch_size", "Requests that shared the last decode forward."),
    ("decode_view_bytes", "gauge", "decode_view_bytes",
     "Largest per-layer padded attention view of the last batched decode step (a transient, not in kv_bytes)."),
    ("decode_forwards_total", "counter", "decode_forwards_total", "Decode forward calls (batched or single)."),
    ("decode_batched_rows_total", "counter", "decode_batched_rows_total",
     "Tokens decoded in forwards shared by several requests."),
    ("decode_alone_steps_total", "counter", "decode_alone_steps_total",
     "Decode steps a request ran in a forward of its own while others were decoding (batching off, or its store "
     "cannot share a forward)."),
    ("attention_padded_row_layers_total", "counter", "attention_padded_row_layers_total",
     "(request, layer) attentions run in a shared padded SDPA."),
    ("attention_own_row_layers_total", "counter", "attention_own_row_layers_total",
     "(request, layer) attentions run by the store's own call inside a shared forward (quantized, ragged...)."),
    ("decode_stacked_row_layers_total", "counter", "decode_stacked_row_layers_total",
     "(request, layer) decode steps run in one call per stack block (frozen KIVI stores in shared buffers)."),
    ("decode_graph_replays_total", "counter", "decode_graph_replays_total",
     "Decode steps of the stack blocks replayed from a recorded CUDA graph (memfit.graphs.BlockGraph)."),
    ("decode_graph_captures_total", "counter", "decode_graph_captures_total",
     "CUDA graphs recorded for the stack blocks' step (one each time the set of blocks changes)."),
    ("decode_graph_capture_seconds_total", "counter", "decode_graph_capture_seconds_total",
     "Seconds spent recording those graphs (each: about one eager step plus the graph's instantiation)."),
    ("kv_stack_blocks", "gauge", "kv_stack_blocks", "Stack blocks allocated (memfit.core.stacks)."),
    ("kv_stack_blocks_merged_total", "counter", "stack_blocks_merged_total",
     "Stack blocks that went by merging a key's small blocks into one (fewer launches per decode step)."),
    ("kv_stack_slack_bytes", "gauge", "kv_stack_slack_bytes",
     "Bytes of stack-block rows no request holds (counted against --kv-memory)."),
]


def prometheus_text(snap: dict[str, Any]) -> str:
    lines = []
    for name, kind, key, help_text in _METRICS:
        lines += [f"# HELP memfit_{name} {help_text}", f"# TYPE memfit_{name} {kind}",
                  f"memfit_{name} {float(snap.get(key, 0)):g}" if kind == "gauge" and key == "tokens_per_second"
                  else f"memfit_{name} {int(snap.get(key, 0))}"]
    return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """The `memfit_*` samples of a /metrics page (for tests and the load test)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("memfit_"):
            name, value = line.rsplit(" ", 1)
            out[name[len("memfit_") :]] = float(value)
    return out
