"""Tensor parallelism on the CPU: 2 gloo ranks under torchrun, a tiny random Llama split by transformers' plan.

Every method (and a composition, an allocation) must give the single-process logits and tokens, and each rank must
keep exactly the single-process tokens of its own KV heads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from memfit.core.method import all_methods

EVICTING = sorted(n for n, c in all_methods().items() if c.family not in ("quantization", "reference"))
CASES = [("full", None, ""), *((m, 0.4, "") for m in EVICTING), ("snapkv+kivi", 0.4, ""), ("snapkv", 0.4, "adakv")]

WORKER = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from memfit import distributed
    from memfit.api import make_cache
    from memfit.engine import generate, pad_left
    from memfit.models import load_model

    path, cases, out_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    rank, world = distributed.init("cpu")
    model, _ = load_model(path, tp=True, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    ids, mask = pad_left([torch.randint(3, 120, (n,), generator=g).tolist() for n in (40, 31)])
    out = []
    for spec, budget, allocation in cases:
        params = {}
        if spec.startswith("snapkv"):
            params["snapkv.window" if "+" in spec else "window"] = 4
        if "kivi" in spec:
            params.update({"kivi.group_size": 8, "kivi.residual": 8})
        rows = []
        for mdl in (model, ref):
            cache = make_cache(mdl, spec, budget, params, allocation=allocation or "uniform")
            gen = generate(mdl, ids, mask, cache, max_new_tokens=5)
            rows.append((cache, gen))
        (tc, tg), (rc, rg) = rows
        keys_equal = True
        for a, b in zip(tc.core.layers, rc.core.layers):
            if a.keys is None or allocation:  # quantized / ragged stores: compare bytes and logits only
                continue
            per = b.keys.shape[1] // world
            mine = b.keys[:, rank * per:(rank + 1) * per]
            keys_equal &= a.keys.shape == mine.shape and torch.allclose(a.keys, mine, atol=1e-5)
        out.append({"spec": spec, "allocation": allocation, "logit_diff": (tg.first_logits - rg.first_logits).abs().max().item(),
                    "same_tokens": tg.tokens == rg.tokens, "backend": tc.backend.name, "keys_equal": bool(keys_equal),
                    "bytes": tc.nbytes(), "ref_bytes": rc.nbytes()})
    # one file per rank: two ranks printing long lines into one pipe can interleave them (writes over PIPE_BUF
    # bytes are not atomic), which once left no whole line to parse
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.bench.testing import toy_tokenizer

    path = tmp_path_factory.mktemp("tiny-tp")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(path)
    toy_tokenizer().save_pretrained(path)
    return path


def _torchrun(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_every_method_tensor_parallel_equals_one_process(tiny_folder, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _check_ranks(_torchrun([str(script), str(tiny_folder), json.dumps(CASES), str(tmp_path)]), tmp_path, CASES)


def _check_ranks(proc: subprocess.CompletedProcess, out: Path, cases: list, backend: str | None = None) -> list:
    """Each rank's rows from WORKER: one per case, the single-process logits, tokens and kept keys of its heads,
    and half the single process's bytes (the ragged store's index tables aside); `backend`: the one every row ran."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        rows = json.loads((out / f"rank{rank}.json").read_text())
        assert len(rows) == len(cases)
        if backend is not None:
            assert [r["backend"] for r in rows] == [backend] * len(cases)
        bad = [r for r in rows if not (r["logit_diff"] < 1e-4 and r["same_tokens"] and r["keys_equal"])]
        assert not bad, [(r["spec"], r["allocation"], r["same_tokens"], r["keys_equal"]) for r in bad]
        for row in rows:
            assert row["bytes"] * 2 == pytest.approx(row["ref_bytes"], rel=0.05), row


FAST_CASES = [("full", None, ""), ("snapkv", 0.4, ""), ("snapkv+kivi", 0.4, ""), ("kvzip", 0.4, "")]


def test_fast_stores_tensor_parallel_equal_one_process(tiny_folder, tmp_path, monkeypatch):
    """The fast backend's static stores (their plain-PyTorch form on the CPU) under 2 ranks: the same logits and
    tokens as one process, each rank holding exactly its heads' share of the kept tokens."""
    monkeypatch.setenv("MEMFIT_FAST_ON_CPU", "1")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _check_ranks(_torchrun([str(script), str(tiny_folder), json.dumps(FAST_CASES), str(tmp_path)]), tmp_path,
                 FAST_CASES, backend="fast")


def _run_retrying_gloo_abort(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run once more when a rank died of gloo's "terminate called without an active exception" (SIGABRT from its
    threads; seen on the shared CI box about once in twenty runs of this test and never reproduced locally: a known
    issue left open in the closing notes), so that the test checks the answers, not that rare abort."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    return proc


def test_cli_tp_dummy_weights_equal_one_process(tmp_path):
    """`--load-format dummy --tp 2`: rank 0 writes the random weights once (the same ones one process draws), the
    ranks load their shards of them, and the run answers as the single process does."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512,
        "bos_token_id": 1, "eos_token_id": 2}))
    args = ["--load-format", "dummy", "--model", str(config), "--method", "snapkv", "--budget", "0.5", "--device",
            "cpu", "--prompt", "The grass is green. " * 8, "--max-new-tokens", "6", "--no-chat", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               MEMFIT_CACHE=str(tmp_path / "cache"))
    runs = [_run_retrying_gloo_abort([sys.executable, "-m", "memfit.cli", "run", *extra, *args], env)
            for extra in (["--tp", "2"], [])]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    tp_row, one = (json.loads(next(line for line in p.stdout.splitlines() if line.startswith("{"))) for p in runs)
    assert tp_row["tp"] == 2 and tp_row["kv_bytes_held_per_rank"] == [one["kv_bytes_held"] // 2] * 2
    assert tp_row["text"] == one["text"] and tp_row["kv_bytes_full"] == one["kv_bytes_full"]
    written = list((tmp_path / "cache" / "dummy").iterdir())
    assert len(written) == 1 and (written[0] / "config.json").is_file()  # one finished folder, no leftover .tmp


def test_cli_tp_reports_per_rank_bytes(tiny_folder):
    proc = subprocess.run(
        [sys.executable, "-m", "memfit.cli", "run", "--tp", "2", "--model", str(tiny_folder), "--method", "snapkv",
         "--budget", "0.5", "--prompt", "The grass is green. " * 20, "--max-new-tokens", "4", "--no-chat", "--json"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1  # rank 0 prints
    r = rows[0]
    assert r["tp"] == 2 and len(r["kv_bytes_held_per_rank"]) == 2
    assert sum(r["kv_bytes_held_per_rank"]) == r["kv_bytes_held"] < r["kv_bytes_full"]


def test_tp_bad_inputs(capsys, monkeypatch, tiny_folder, tmp_path):
    from memfit.cli import main

    for args, msg in ((["--tp", "1"], "at least 2"), (["--tp", "2", "--weights-memory", "1GiB"], "does not combine"),
                      (["--tp", "3", "--model", str(tiny_folder)], "must both divide by 3"),  # found before launching
                      (["--tp", "2", "--model", str(tmp_path / "none")], "needs a Hugging Face model folder")):
        monkeypatch.setattr(sys, "argv", ["memfit", "run", "--prompt", "hi", *args])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and msg in err and err.count("\n") == 1, err
    for args, msg in ((["--tp", "1"], "at least 2"),  # serve: one error before any rank starts
                      (["--tp", "3", "--model", str(tiny_folder)], "must both divide by 3"),
                      (["--tp", "2", "--load-format", "dummy", "--model", "nope-7b"], "unknown config")):
        monkeypatch.setattr(sys, "argv", ["memfit", "serve", *args])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and msg in err and err.count("\n") == 1, err


BENCH_ARGS = ["--methods", "snapkv", "--budgets", "0.5", "--tasks", "niah_single_number,fidelity", "--context", "128",
              "--samples", "2", "--batch-size", "2", "--param", "window=4"]


def test_cli_bench_tp_rank0_writes_rows(tiny_folder, tmp_path):
    from memfit.bench.report import read_rows
    from memfit.bench.runner import run_bench

    out = tmp_path / "tp"
    proc = subprocess.run(
        [sys.executable, "-m", "memfit.cli", "bench", "--tp", "2", "--model", str(tiny_folder), *BENCH_ARGS,
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("memfit bench ·") == 1  # rank 0 prints the table
    assert (out / "report.md").is_file()
    rows = read_rows(out / "results.jsonl")
    assert sorted((r["method"], r["task"]) for r in rows) == [  # one row each: rank 1 wrote none
        ("full", "fidelity"), ("full", "niah_single_number"), ("snapkv", "fidelity"), ("snapkv", "niah_single_number")]
    one = {(r["method"], r["task"]): r for r in run_bench(
        str(tiny_folder), out=tmp_path / "one", progress=False, methods=["snapkv"], budgets=[0.5],
        tasks=["niah_single_number", "fidelity"], context=128, samples=2, batch_size=2,
        params={"snapkv": {"window": 4}}).rows}
    for r in rows:
        ref = one[(r["method"], r["task"])]
        assert r["tp"] == 2 and r["model"].endswith("[tp 2]") and not ref.get("tp")
        per_rank = r["kv_bytes_held_per_rank"]
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1]  # each rank holds half the KV heads
        assert abs(sum(per_rank) - r["kv_bytes_held"]) <= 1 and r["kv_bytes_held"] == ref["kv_bytes_held"]
        assert r["kv_bytes_full"] == ref["kv_bytes_full"]
        if r["method"] == "snapkv":
            assert r["kv_bytes_held"] < r["kv_bytes_full"]
        assert r["predictions"] == ref["predictions"]  # same answers as one process
        for k in ("kl", "top1", "ppl"):
            assert (r[k] is None) == (ref[k] is None) and (r[k] is None or r[k] == pytest.approx(ref[k], abs=1e-4))


def test_bench_tp_bad_inputs(capsys, monkeypatch, tiny_folder, tmp_path):
    from memfit.cli import main

    out = tmp_path / "never"
    for args, msg in ((["--tp", "1"], "at least 2"),
                      (["--tp", "2", "--weights", "rtn:4"], "does not combine with --weights"),
                      (["--tp", "2", "--methods", "nope"], "nope"),  # found before any rank is launched
                      (["--tp", "3", "--model", str(tiny_folder)], "must both divide by 3")):
        monkeypatch.setattr(sys, "argv", ["memfit", "bench", "--out", str(out), *args])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and msg in err and err.count("\n") == 1, err
        assert not out.exists()


def test_serve_tp_answers_as_memfit_run(tiny_folder):
    """`memfit serve --tp 2`: rank 0 serves HTTP, rank 1 follows its ticks; concurrent requests get the text one
    process's `memfit run` gives (greedy), and stopping the launcher stops both ranks."""
    import concurrent.futures
    import signal
    import time
    import urllib.request

    from memfit.serve import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def start() -> tuple[subprocess.Popen, int]:
        sock = free_port()
        port = sock.getsockname()[1]
        sock.close()  # the port is free now; the launcher's own rendezvous may still take it before we bind
        return subprocess.Popen(
            [sys.executable, "-m", "memfit.cli", "serve", "--tp", "2", "--model", str(tiny_folder), "--method",
             "snapkv", "--budget", "0.5", "--param", "window=4", "--device", "cpu", "--port", str(port),
             "--log-level", "warning", "--kv-memory", "64MiB"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), port

    prompts = ["The grass is green. " * 6, "Numbers: 1 2 3 4 5 6 7 8 9 " * 3, "Once upon a time " * 5]
    server, port = start()
    try:
        for attempt in range(3):  # a lost race for the port (seen once in CI) is retried, nothing else
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None:
                        break
                    time.sleep(0.5)
            if server.poll() is None:
                break
            err = server.stderr.read()
            assert "address already in use" in err and attempt < 2, err[-3000:]
            server, port = start()

        def complete(prompt: str) -> str:
            body = json.dumps({"model": tiny_folder.name, "prompt": prompt, "max_tokens": 6, "temperature": 0}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.loads(r.read())["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            served = list(pool.map(complete, prompts))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise AssertionError("memfit serve --tp 2 did not stop on SIGTERM") from None
    from memfit.engine import run
    from memfit.models import load_model

    pair = load_model(str(tiny_folder), progress=False)  # one process, the same settings as `memfit run` uses
    for prompt, text in zip(prompts, served, strict=True):
        one = run(prompt, model=pair, method="snapkv", budget=0.5, params={"window": 4}, max_new_tokens=6, chat=False)
        assert text == one.text, (prompt, text, one.text)
