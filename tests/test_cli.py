"""CLI: bad input gives one clear error line and a non-zero exit; methods listing; run --json on the default model."""

from __future__ import annotations

import json
import os
import sys

import pytest

from memfit.cli import main


def invoke(monkeypatch, capsys, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["memfit", *args])
    if stdin is not None:
        import io

        fake = io.StringIO(stdin)
        fake.isatty = lambda: False  # type: ignore[method-assign]
        monkeypatch.setattr(sys, "stdin", fake)
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "--method", "nope", "--prompt", "hi"], "unknown method 'nope'"),
        (["run", "--budget", "0", "--prompt", "hi"], "out of range"),
        (["run", "--budget", "-0.5", "--prompt", "hi"], "out of range"),
        (["run", "--budget", "1.5", "--prompt", "hi"], "out of range"),
        (["run", "--budget", "abc", "--prompt", "hi"], "not a number"),
        (["run", "--prompt", "   "], "prompt is empty"),
        (["run", "--prompt-file", "/definitely/not/here.txt"], "not found"),
        (["run", "--method", "snapkv", "--param", "bogus=1", "--prompt", "hi"], "unknown parameter 'bogus'"),
        (["run", "--method", "snapkv", "--param", "window", "--prompt", "hi"], "KEY=VALUE"),
        (["run", "--method", "snapkv", "--param", "window=abc", "--prompt", "hi"], "not a valid int"),
        (["run", "--prompt", "hi", "--dtype", "int8"], "Unknown dtype"),
        (["run", "--prompt", "hi", "--method", "kivi", "--budget", "0.25"], "snapkv+kivi"),
        (["run", "--prompt", "hi", "--budget", "0.25"], "keeps every token"),
        (["run", "--prompt", "hi", "--method", "full+kivi", "--budget", "0.25"], "keeps every token"),
        (["run", "--prompt", "hi", "--device", "tpu:7"], "device"),
        (["bench", "--methods", "snapkv", "--dtype", "fp64"], "Unknown dtype"),
    ],
)
def test_bad_input_is_one_clear_line(monkeypatch, capsys, args, expected):
    code, out, err = invoke(monkeypatch, capsys, *args)
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in err + out


def test_empty_stdin_prompt(monkeypatch, capsys):
    code, _, err = invoke(monkeypatch, capsys, "run", stdin="")
    assert code != 0 and err.startswith("error: ") and "empty" in err


def test_methods_json_lists_every_method(monkeypatch, capsys):
    from memfit.core.method import all_methods

    code, out, _ = invoke(monkeypatch, capsys, "methods", "--json")
    assert code == 0
    listed = {m["name"]: m for m in json.loads(out)}
    assert set(all_methods()) <= set(listed)
    for name in ("full", "streaming", "snapkv", "h2o"):
        entry = listed[name]
        assert entry["family"] and entry["acts"] and isinstance(entry["params"], dict)
    assert listed["snapkv"]["arxiv"] == "2404.14469"
    assert listed["snapkv"]["params"]["window"]["default"] == 32


@pytest.mark.model
def test_run_json_on_default_model(monkeypatch, capsys, default_model):
    code, out, err = invoke(
        monkeypatch,
        capsys,
        "run",
        "--method",
        "snapkv",
        "--budget",
        "0.5",
        "--max-new-tokens",
        "8",
        "--json",
        "--prompt",
        "The capital of France is Paris. The capital of Italy is Rome. What is the capital of France?",
    )
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    for key in (
        "text",
        "method",
        "budget",
        "prompt_tokens",
        "kv_bytes_full",
        "kv_bytes_held",
        "compression_ratio",
        "peak_memory_bytes",
        "prefill_seconds",
        "decode_tokens_per_second",
    ):
        assert key in row
    assert row["method"] == "snapkv" and row["budget"] == "0.5"
    assert 0 < row["kv_bytes_held"] < row["kv_bytes_full"]
    assert row["text"].strip()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", [["run", "--prompt", "hi"], ["bench", "--methods", "snapkv"]])
def test_cuda_without_cuda_is_one_clear_error(monkeypatch, capsys, command) -> None:
    from memfit.cli import main

    monkeypatch.setattr(sys, "argv", ["memfit", *command, "--device", "cuda"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "CUDA is not available" in err[0], err


def test_openmp_wait_defaults_follow_the_load(monkeypatch):
    """Sleeping waiters on a machine already busy, short spins on an idle one (benchmarks/cpu_contention.py); the
    device line of a run (`--json`'s "device") says which."""
    import torch

    from memfit import openmp_defaults
    from memfit.engine import device_name

    assert openmp_defaults(1.0, 2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_defaults(0.2, 2) == {"GOMP_SPINCOUNT": "10000"}
    assert openmp_defaults(3.9, 8) == {"GOMP_SPINCOUNT": "10000"}
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert device_name(torch.device("cpu")).endswith("OpenMP waits: passive)")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    assert device_name(torch.device("cpu")).endswith("OpenMP waits: spin 10000)")


@pytest.mark.parametrize("set_by_user, torch_first, expected", [
    ({}, False, "memfit"),  # memfit's default: one of the two, by the load
    ({"OMP_WAIT_POLICY": "ACTIVE"}, False, "ACTIVE None"),  # the user's choice stands
    ({"GOMP_SPINCOUNT": "5"}, False, "None 5"),
    ({}, True, "None None"),  # torch loaded its OpenMP runtime first: too late to matter, so memfit leaves it alone
])
def test_openmp_wait_policy_default(set_by_user, torch_first, expected):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(set_by_user)
    code = ("import torch; " if torch_first else "") + (
        "import os, memfit; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() in (("PASSIVE None", "None 10000") if expected == "memfit" else (expected,))
