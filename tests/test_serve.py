"""`memfit serve` on the default model through the official `openai` client, on a loopback port.

Every server here runs uvicorn in a thread on a socket bound to 127.0.0.1:0 and is stopped by its fixture; every
wait is bounded."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
import uvicorn
from conftest import drive
from openai import OpenAI

from memfit.core.budget import Budget
from memfit.engine import run as memfit_run
from memfit.serve import build_server, free_port, parse_bytes
from memfit.serve.app import parse_metrics

pytestmark = pytest.mark.model

METHOD, BUDGET, CHUNK = "snapkv", "0.5", 32  # chunk < prompt: chunked prefill interleaves with decoding
PROMPTS = [
    "Explain in two sentences why the sky looks blue during the day.",
    "Write a short list of three fruits and their colours, one per line.",
    "What is the capital of France? Answer and then add one fact about it.",
]


@contextlib.contextmanager
def running_server(model_and_tok, **kwargs):
    model, tok = model_and_tok
    app = build_server(model, tok, "SmolLM2-135M-Instruct", **kwargs)
    sock = free_port()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx2.get(url + "/metrics", timeout=10).text)


def wait_for(cond, seconds: float = 30.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server(default_model):
    with running_server(default_model, method=METHOD, budget=BUDGET, kv_memory=parse_bytes("1GiB"),
                        prefill_chunk=CHUNK) as (url, _):
        yield url


def test_concurrent_streamed_and_plain_requests_match_memfit_run(server, default_model):
    """Greedy text through the server equals `memfit run` with the same settings, for concurrent streamed and
    non-streamed completions and chat completions."""
    c = client(server)
    n = 12

    def plain_completion(p):
        r = c.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=n, temperature=0)
        return r.choices[0].text, r.usage

    def streamed_completion(p):
        s = c.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=n, stream=True,
                                 stream_options={"include_usage": True})
        parts, usage = [], None
        for chunk in s:
            usage = chunk.usage or usage
            parts += [ch.text for ch in chunk.choices]
        return "".join(parts), usage

    def streamed_chat(p):
        s = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": p}],
                                      max_tokens=n, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices), None

    def plain_chat(p):
        r = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": p}],
                                      max_tokens=n)
        return r.choices[0].message.content, r.usage

    jobs = [(plain_completion, PROMPTS[0], False), (streamed_completion, PROMPTS[1], False),
            (streamed_chat, PROMPTS[2], True), (plain_chat, PROMPTS[0], True)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: j[0](j[1]), jobs))
    for (_, prompt, chat), (text, usage) in zip(jobs, results, strict=True):
        ref = memfit_run(prompt, model=default_model, method=METHOD, budget=BUDGET, max_new_tokens=n, chat=chat,
                         prefill_chunk=CHUNK)
        assert text == ref.text, (prompt, chat)
        if usage is not None:
            assert usage.prompt_tokens == ref.prompt_tokens
            assert usage.model_extra["kv_bytes_held"] == ref.kv_bytes_held
            assert usage.model_extra["kv_bytes_full"] == ref.kv_bytes_full
            assert 0 < usage.model_extra["kv_bytes_held"] < usage.model_extra["kv_bytes_full"]
    m = metrics(server)
    assert m["requests_total"] >= len(jobs) and m["kv_bytes_held"] == 0 and m["requests_running"] == 0


def test_per_request_compression(server, default_model):
    """The memfit body field picks the method per request; usage reports the bytes `memfit run` holds."""
    c = client(server)
    prompt = " ".join(PROMPTS * 2)
    r = c.completions.create(model="default", prompt=prompt, max_tokens=6,
                             extra_body={"memfit": {"method": "streaming", "budget": 48}})
    held, full = r.usage.model_extra["kv_bytes_held"], r.usage.model_extra["kv_bytes_full"]
    ref = memfit_run(prompt, model=default_model, method="streaming", budget=48, max_new_tokens=6, chat=False,
                     prefill_chunk=CHUNK)
    assert r.choices[0].text == ref.text and held == ref.kv_bytes_held and full == ref.kv_bytes_full
    assert held < full
    # spans default to on for an eviction method (as `memfit run`); a request may turn them off, holding fewer bytes
    off = c.completions.create(model="default", prompt=prompt, max_tokens=6,
                               extra_body={"memfit": {"method": "streaming", "budget": 48, "spans": "off"}})
    ref_off = memfit_run(prompt, model=default_model, method="streaming", budget=48, max_new_tokens=6, chat=False,
                         prefill_chunk=CHUNK, spans="off")
    assert off.usage.model_extra["kv_bytes_held"] == ref_off.kv_bytes_held < held


def test_byte_prediction_bounds_what_the_cache_holds(default_model, spec="snapkv+kivi", budget="0.25"):
    """Admission's prediction against `nbytes()` after a real generation: never below it, and above it by at most
    10 % or one full-precision residual window (128 tokens) for a quantizer."""
    from memfit.api import make_cache
    from memfit.engine import encode_prompts, generate
    from memfit.serve.admission import BytePredictor, ModelShape

    model, tok = default_model
    ids, mask = encode_prompts(tok, [" ".join(PROMPTS * 8)], chat=False)
    cache = make_cache(model, spec, budget)
    gen = generate(model, ids, mask, cache, 4, [])
    held = cache.nbytes()
    shape = ModelShape.of(model)
    predicted = BytePredictor(shape).predict(spec, Budget.parse(budget), {}, ids.shape[1], len(gen.tokens[0]))
    window = 128 * shape.full_bytes_per_token
    assert held <= predicted <= max(1.1 * held, held + window), (spec, predicted, held)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ("{not json", 400, None),
        ({"prompt": "hi", "max_tokens": 4, "memfit": {"method": "nosuch"}}, 400, "memfit"),
        ({"prompt": "hi", "max_tokens": 4, "memfit": {"method": "snapkv", "budget": 1.5}}, 400, "memfit"),
        ({"prompt": "hi", "max_tokens": 4, "memfit": {"method": "snapkv", "budget": 0.5, "spans": "maybe"}}, 400,
         "memfit.spans"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"prompt": "word " * 9000, "max_tokens": 4}, 400, "prompt"),
        ({"prompt": "", "max_tokens": 4}, 400, "prompt"),
        ({"prompt": "hi", "temperature": 0.7}, 400, "temperature"),
        ({"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ],
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, body, status, param):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx2.post(server + "/v1/completions", content=data, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    assert httpx2.get(server + "/health", timeout=10).json() == {"status": "ok"}
    assert [m.id for m in client(server).models.list().data] == ["SmolLM2-135M-Instruct"]


def test_client_disconnect_mid_stream_frees_its_store(server):
    before = metrics(server)
    with httpx2.stream("POST", server + "/v1/completions", timeout=60, json={
            "prompt": PROMPTS[0], "max_tokens": 400, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got >= 3:
                break
        assert metrics(server)["kv_bytes_held"] > 0  # the request holds a store while it streams
    # the connection is closed: the store is dropped on the next scheduler tick and its bytes return to the pool
    assert wait_for(lambda: metrics(server)["kv_bytes_held"] == 0 and metrics(server)["requests_running"] == 0, 20)
    after = metrics(server)
    assert after["cancelled_total"] == before.get("cancelled_total", 0) + 1
    assert after["generated_tokens_total"] - before["generated_tokens_total"] < 400


def test_admission_queues_a_request_that_does_not_fit_and_serves_it_once_memory_frees(default_model):
    """A pool sized for one request: the second waits in the queue and runs once the first finishes."""
    from memfit.serve.admission import BytePredictor, ModelShape

    prompt, n = PROMPTS[1], 10
    ref = memfit_run(prompt, model=default_model, method="full", max_new_tokens=n, chat=False, prefill_chunk=CHUNK)
    one = BytePredictor(ModelShape.of(default_model[0])).reserve("full", Budget(), {}, ref.prompt_tokens, n, CHUNK)
    with running_server(default_model, method="full", kv_memory=int(one * 1.5), prefill_chunk=CHUNK) as (url, _):
        c = client(url)
        waiting = []

        def watch():
            for _ in range(2000):
                m = metrics(url)
                waiting.append(m["requests_waiting"])
                if m["requests_total"] >= 2 and m["requests_running"] == 0:
                    return
                time.sleep(0.01)

        with ThreadPoolExecutor(3) as pool:
            w = pool.submit(watch)
            futs = [pool.submit(c.completions.create, prompt=prompt, model="default", max_tokens=n) for _ in range(2)]
            texts = [f.result(timeout=120).choices[0].text for f in futs]
            w.result(timeout=60)
        assert texts == [ref.text, ref.text]
        assert max(waiting) >= 1  # the second request queued while the first held the pool
        m = metrics(url)
        assert m["preemptions_total"] == 0 and m["requests_total"] == 2 and m["kv_bytes_held"] == 0


def test_a_low_prediction_preempts_the_newest_request_and_its_text_is_unchanged(default_model):
    """Force predictions to 1 byte so a second request is admitted into a pool smaller than the two together: the
    newest is preempted (re-queued, counted in /metrics, and reserving what it held), waits until the oldest
    finishes, is regenerated, and both stream the same text as `memfit run`."""
    prompt, n = PROMPTS[0], 16
    ref = memfit_run(prompt, model=default_model, method="full", max_new_tokens=n, chat=True, prefill_chunk=CHUNK)
    assert ref.generated_tokens > 12
    with running_server(default_model, method="full", kv_memory=int(ref.kv_bytes_full * 0.75),
                        prefill_chunk=CHUNK) as (url, app):
        predictor = app.state.scheduler.predictor
        predictor.reserve = lambda *a, **k: 1
        predictor.predict = lambda *a, **k: 1
        c = client(url)
        started = threading.Event()

        def streamed(first: bool):
            if not first:
                assert started.wait(60)  # the second request arrives while the first is decoding
            parts = []
            for ch in c.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=n, stream=True):
                parts += [x.delta.content or "" for x in ch.choices]
                started.set()
            return "".join(parts)

        with ThreadPoolExecutor(2) as pool:
            texts = list(pool.map(streamed, [True, False]))
        assert texts == [ref.text, ref.text]
        m = metrics(url)
        assert m["preemptions_total"] == 1 and m["kv_bytes_held"] == 0 and m["requests_total"] == 2


# -- one batched decode forward over every running request (memfit.core.batch_view) ------------------------------
def alone(model, ids, method, budget, params, n, chunk, eos=()):
    """What the request produces by itself: `memfit.engine.generate` with its own cache (tokens, bytes held)."""
    import torch

    from memfit.api import make_cache
    from memfit.engine import generate

    cache = make_cache(model, method, budget, params)
    x = torch.tensor([ids])
    gen = generate(model, x, torch.ones_like(x), cache, n, list(eos), chunk)
    return gen.tokens[0], cache.nbytes()


# every kind of store and per-step policy: dense (padded SDPA), per-step eviction (H2O, TOVA, Scissorhands,
# StreamingLLM), prefill eviction (SnapKV at two budgets), a quantized store with a residual (KIVI)
TINY_SPECS = [("full", None, {}), ("snapkv", "0.5", {}), ("h2o", "0.5", {}), ("streaming", "24", {}),
              ("snapkv+kivi", "0.5", {"kivi.residual": 16, "kivi.group_size": 16}), ("tova", "0.5", {}),
              ("scissorhands", "0.5", {}), ("snapkv", "0.25", {})]


@pytest.mark.parametrize("batch_decode", [True, False])
def test_batched_decode_gives_each_request_what_it_gets_alone(batch_decode):
    """Requests of different methods, budgets and prompt lengths join at different ticks (continuous batching):
    each one's greedy tokens and final store bytes equal a lone `generate`, and one forward decodes them all
    (batch_decode=False: one forward per request, and /metrics counts those steps as alone)."""
    import torch
    from conftest import tiny_llama

    from memfit.serve.scheduler import Request, Scheduler

    model, n, chunk = tiny_llama(), 24, 16
    gen = torch.Generator().manual_seed(1)
    lens = (40, 57, 33, 70, 90, 45, 64, 50)
    joins = [0, 0, 2, 3, 5, 9, 11, 20]
    specs = TINY_SPECS if batch_decode else TINY_SPECS[:3]  # one forward per request: three show the accounting
    prompts = [torch.randint(0, 128, (t,), generator=gen).tolist() for t in lens][: len(specs)]
    refs = [alone(model, ids, m, b, p, n, chunk) for (m, b, p), ids in zip(specs, prompts, strict=True)]
    scheduler = Scheduler(model, kv_memory=1 << 30, prefill_chunk=chunk, batch_decode=batch_decode)
    reqs = [Request(ids, n, m, Budget.parse(b), p, sink=None) for (m, b, p), ids in zip(specs, prompts,
                                                                                          strict=True)]
    got = drive(scheduler, reqs, joins=joins[: len(specs)])
    for i, (spec, req, (tokens, held)) in enumerate(zip(specs, reqs, refs, strict=True)):
        assert got[i] == tokens, spec
        assert req.kv_bytes_held == held, spec
    stats = scheduler.stats
    steps = sum(len(t) - 1 for t, _ in refs)  # the first token of each comes from its prefill
    if batch_decode:
        assert stats["decode_forwards_total"] < steps / 3  # 8 requests, mostly running together
        assert stats["decode_batched_rows_total"] > 0.8 * steps and stats["decode_alone_steps_total"] == 0
        assert stats["attention_padded_row_layers_total"] > 0  # dense stores share one SDPA
        assert stats["attention_own_row_layers_total"] > 0  # the KIVI store attends on its own row
        assert all(r.decode_steps_batched > 0 for r in reqs)
    else:
        assert stats["decode_forwards_total"] == steps and stats["decode_batched_rows_total"] == 0
        assert stats["decode_alone_steps_total"] > steps / 2  # steps while others were decoding too
        assert all(r.decode_steps_batched == 0 for r in reqs)


@pytest.mark.parametrize("max_view_bytes", [None, 1])
def test_padded_view_attends_each_row_over_its_own_tokens_only(max_view_bytes):
    """BatchView's shared SDPA against each row's own attention: rows of different lengths, one with placeholder
    (invalid) slots; the output of each row must not depend on the others' tokens. A view over its byte cap is not
    built: every row attends on its own, with the same outputs."""
    import torch

    from memfit.core.batch_view import BatchView
    from memfit.core.cache import CompressedCache, dense_attention
    from memfit.core.method import Method

    gen = torch.Generator().manual_seed(0)
    hkv, h, d = 2, 4, 8
    cores = []
    for t in (5, 11, 8):
        core = CompressedCache(1, Method())
        core.step(0, *(torch.randn(1, hkv, t, d, generator=gen) for _ in range(2)),
                  torch.randn(1, h, t, d, generator=gen), d**-0.5, None)
        cores.append(core)
    cores[1].layers[0].valid = torch.rand(1, hkv, 11, generator=gen) > 0.3  # placeholders in the middle row
    held = [(c.layers[0].keys, c.layers[0].values, c.layers[0].valid) for c in cores]
    k, v, q = (torch.randn(3, x, 1, d, generator=gen) for x in (hkv, hkv, h))
    view = BatchView(cores, max_view_bytes=max_view_bytes)
    out = view.step(0, k, v, q, d**-0.5, None)
    for i, (hk, hv, hvalid) in enumerate(held):
        valid = None if hvalid is None else torch.cat([hvalid, torch.ones(1, hkv, 1, dtype=torch.bool)], -1)
        ref = dense_attention(q[i : i + 1], torch.cat([hk, k[i : i + 1]], 2), torch.cat([hv, v[i : i + 1]], 2),
                              valid, d**-0.5)
        torch.testing.assert_close(out[i : i + 1], ref)
        assert cores[i].layers[0].num_slots == held[i][0].shape[2] + 1  # the token went into its own store
    if max_view_bytes is None:
        assert view.padded_rows == 3 and view.own_rows == 0 and view.view_bytes > 0
    else:
        assert view.padded_rows == 0 and view.own_rows == 3 and view.view_bytes == 0


def test_batched_decode_on_the_default_model_matches_memfit_run(default_model):
    """The correctness bar on the real model: full, snapkv, h2o, streaming and snapkv+kivi requests with prompts of
    different lengths join one by one and decode together; each one's greedy tokens and bytes equal a lone run."""
    from memfit.engine import encode_prompts
    from memfit.serve.scheduler import Request, Scheduler

    model, tok = default_model
    specs = [("full", None), ("snapkv", "0.5"), ("h2o", "0.5"), ("streaming", "24"), ("snapkv+kivi", "0.5")]
    texts = [PROMPTS[0], " ".join(PROMPTS), PROMPTS[1], " ".join(PROMPTS[1:]), PROMPTS[2]]
    prompts = [encode_prompts(tok, [t], chat=False)[0][0].tolist() for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # every request has its own length
    n = 8
    refs = [alone(model, ids, m, b, {}, n, CHUNK) for (m, b), ids in zip(specs, prompts, strict=True)]
    scheduler = Scheduler(model, kv_memory=1 << 30, prefill_chunk=CHUNK)
    reqs = [Request(ids, n, m, Budget.parse(b), {}, sink=None) for (m, b), ids in zip(specs, prompts, strict=True)]
    got = drive(scheduler, reqs, joins=[0, 1, 3, 4, 6])
    for i, (spec, req, (tokens, held)) in enumerate(zip(specs, reqs, refs, strict=True)):
        assert got[i] == tokens, spec
        assert req.kv_bytes_held == held, spec
    assert scheduler.stats["decode_batched_rows_total"] > scheduler.stats["decode_forwards_total"]
    assert all(r.decode_steps_batched > 0 for r in reqs)


def test_loadtest_reports_what_the_server_served(server, tmp_path):
    """`memfit loadtest` against a running server: every request, every token (ignore_eos), a first token before
    the last, one gap per later token, and the three files; the closed loop sends at most `concurrency` at once."""
    from memfit.serve.loadtest import loadtest

    row = loadtest(server, concurrency=2, requests=4, prompt_tokens=40, max_tokens=5, out=tmp_path, tokenizer="none",
                   show_progress=False)
    assert row["requests_ok"] == 4 and row["requests_failed"] == 0 and row["output_tokens"] == 20
    assert row["request_rate"] is None and row["output_tokens_per_second"] > 0
    samples = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == [0, 1, 2, 3]
    for s in samples:
        assert s["ok"] and 0 < s["ttft"] <= s["latency"] and len(s["itl"]) == s["output_tokens"] - 1 == 4
        assert s["kv_bytes_held"] and s["kv_bytes_full"]  # memfit's usage fields came back
    ends = sorted(s["sent"] + s["latency"] for s in samples)
    assert sorted(s["sent"] for s in samples)[2] >= ends[0] - 0.05  # the third request waited for a free client
    assert "| requests ok / failed | 4 / 0 |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "summary.jsonl").read_text())["requests"] == 4


def test_loadtest_request_rate_sends_on_its_own_clock(server, tmp_path):
    """`--request-rate`: requests leave at their Poisson arrival times (seeded), whatever the server's pace; a rate
    that is not above zero is a clear error."""
    from memfit.errors import ConfigError
    from memfit.serve.loadtest import arrival_times, loadtest

    times = arrival_times(4, 5.0, seed=3)
    assert times[0] == 0.0 and times == sorted(times) and times == arrival_times(4, 5.0, seed=3)
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    row = loadtest(server, concurrency=4, requests=4, prompt_tokens=40, max_tokens=3, out=tmp_path, tokenizer="none",
                   show_progress=False, request_rate=5.0, seed=3)
    assert row["requests_ok"] == 4 and row["request_rate"] == 5.0
    samples = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    for s, at in zip(samples, times, strict=True):
        assert at - 0.01 <= s["sent"] <= at + 1.0, (s["sent"], at)  # sent at its time, not when a reply came
    assert "request rate 5.0/s" in (tmp_path / "report.md").read_text()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="request-rate"):
            loadtest(server, concurrency=1, requests=1, prompt_tokens=8, max_tokens=1, request_rate=bad,
                     show_progress=False)
