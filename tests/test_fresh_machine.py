"""What a new user meets first (issue #13): usage errors, --version, one `error:` line per bad input before any model
work, the context-window check and --truncate, Ctrl-C (exit 130, results.jsonl whole, nothing outside --out)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from memfit.bench.testing import toy_tokenizer
from memfit.cli import main, plain_table
from memfit.errors import ConfigError
from memfit.units import format_bytes
from memfit.window import context_window, fit_prompts

WINDOW = 96  # the tiny model's context window (max_position_embeddings)
LONG = " ".join(f"Sentence number {i} says that the sky is blue." for i in range(60))  # ~600 toy tokens


def invoke(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["memfit", *args])
    code: Any = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return int(code or 0), captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[torch.nn.Module, Any]:
    tok = toy_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=WINDOW, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval(), tok


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the error must come before model work."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("memfit.models.load_model", refuse)
    monkeypatch.setattr("memfit.bench.runner._load", refuse)


@pytest.fixture
def tiny_loaded(monkeypatch, tiny_pair):
    """`memfit run`/`bench` get the tiny model whatever --model says (no download, a 96-position window)."""
    monkeypatch.setattr("memfit.models.load_model", lambda *a, **k: tiny_pair)
    monkeypatch.setattr("memfit.bench.runner._load", lambda *a, **k: tiny_pair)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_pair
    torch.set_num_threads(threads)


# -- usage -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, says",
    [
        ([], "Commands:"),  # `memfit` alone: the usage text
        (["run", "--bogus"], "No such option: --bogus"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["run", "--max-new-tokens", "many"], "Invalid value for '--max-new-tokens'"),
    ],
)
def test_usage_errors_print_usage_not_a_traceback(monkeypatch, capsys, args, says) -> None:
    code, out, err = invoke(monkeypatch, capsys, *args)
    assert code in ((0, 2) if not args else (2,))
    assert "Usage: memfit" in out + err and says in out + err
    assert "Traceback" not in out + err


def test_version(monkeypatch, capsys) -> None:
    from memfit import __version__

    code, out, err = invoke(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"memfit {__version__}" and not err


def test_help_shows_no_type_tag_after_flags(monkeypatch, capsys) -> None:
    code, out, _ = invoke(monkeypatch, capsys, "run", "--help")
    assert code == 0 and "--truncate" in out and "--json" in out
    assert "<bool>" not in out


# -- bad input: one line, exit 2, no model work --------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "--prompt-file", "/bin/ls"], "not a text file"),
        (["run", "--prompt", "hi", "--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
        (["run", "--prompt", "hi", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
        (["run", "--prompt", "hi", "--truncate", "middle"], "--truncate must be 'left'"),
        (["bench", "--out", "/proc/memfit-bench"], "cannot create this folder"),
        (["bench", "--context", "10"], "--context must be >= 64"),
        (["bench", "--samples", "0"], "--samples must be >= 1"),
        (["bench", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["bench", "--corpus", "/bin/ls"], "not a text file"),
        (["bench", "--tasks", "nope"], "unknown task"),
    ],
)
def test_bad_input_before_model_work(monkeypatch, capsys, tmp_path, no_model, args, expected) -> None:
    if args[0] == "bench" and "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out")]
    code, out, err = invoke(monkeypatch, capsys, *args)
    assert code == 2 and expected in one_error_line(err) and "Traceback" not in out + err
    assert not (tmp_path / "out").exists()  # a refused bench leaves no folder behind


def test_latin1_prompt_file_is_not_text(monkeypatch, capsys, tmp_path, no_model) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait".encode("latin-1"))
    code, _, err = invoke(monkeypatch, capsys, "run", "--prompt-file", str(f))
    assert code == 2 and "not a text file" in one_error_line(err)


def test_bench_out_is_a_file(monkeypatch, capsys, tmp_path, no_model) -> None:
    f = tmp_path / "results"
    f.write_text("keep me")
    code, _, err = invoke(monkeypatch, capsys, "bench", "--out", str(f))
    assert code == 2 and "is a file" in one_error_line(err)
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["results"]


# -- the context window ----------------------------------------------------------------------------------------------
def test_context_window_is_read_from_the_config(tiny_pair) -> None:
    assert context_window(tiny_pair[0]) == WINDOW


def test_fit_prompts_refuses_with_both_numbers(tiny_pair) -> None:
    tok = tiny_pair[1]
    n = len(tok(LONG)["input_ids"])
    assert n > WINDOW
    with pytest.raises(ConfigError) as e:
        fit_prompts(tok, [LONG], chat=False, window=WINDOW, new_tokens=8)
    msg = str(e.value)
    assert f"{n:,} tokens" in msg and f"{WINDOW:,} positions" in msg
    assert "--truncate left" in msg and "--prefill-chunk" in msg
    # a short prompt passes untouched; so does a long one with no known window
    assert fit_prompts(tok, ["short"], chat=False, window=WINDOW, new_tokens=8) == ["short"]
    assert fit_prompts(tok, [LONG], chat=False, window=None, new_tokens=8) == [LONG]


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncate_keeps_the_named_end(tiny_pair, side) -> None:
    tok = tiny_pair[1]
    (cut,) = fit_prompts(tok, [LONG], chat=False, window=WINDOW, new_tokens=8, truncate=side)
    n = len(tok(cut)["input_ids"])
    assert WINDOW - 8 - 3 <= n <= WINDOW - 8  # fills the room (a re-tokenized edge may cost a token or two)
    assert LONG.endswith(cut) if side == "left" else LONG.startswith(cut)


def test_chunked_prefill_with_an_eviction_budget_may_pass_the_window(tiny_pair) -> None:
    tok = tiny_pair[1]
    kw = dict(chat=False, window=WINDOW, new_tokens=8)
    assert fit_prompts(tok, [LONG], method="streaming", budget=48, prefill_chunk=16, **kw) == [LONG]
    with pytest.raises(ConfigError):  # budget + chunk + new tokens > window
        fit_prompts(tok, [LONG], method="streaming", budget=80, prefill_chunk=16, **kw)
    with pytest.raises(ConfigError):  # the full cache holds everything, chunked or not
        fit_prompts(tok, [LONG], method="full", prefill_chunk=16, **kw)


def test_run_refuses_a_long_prompt_before_generating(monkeypatch, capsys, tiny_loaded) -> None:
    def no_generation(*a: Any, **k: Any) -> Any:
        raise AssertionError("generation started")

    monkeypatch.setattr("memfit.engine.run", no_generation)
    code, out, err = invoke(monkeypatch, capsys, "run", "--no-chat", "--max-new-tokens", "4", "--prompt", LONG)
    assert code == 2 and f"{WINDOW:,} positions" in one_error_line(err) and not out


def test_run_truncate_left_fits_and_runs(monkeypatch, capsys, tiny_loaded) -> None:
    code, out, err = invoke(
        monkeypatch, capsys, "run", "--no-chat", "--max-new-tokens", "4", "--truncate", "left", "--json",
        "--prompt", LONG,
    )
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["prompt_tokens"] <= WINDOW - 4 and "cut to fit" in err


# -- Ctrl-C ----------------------------------------------------------------------------------------------------------
def test_ctrl_c_during_run(monkeypatch, capsys, tiny_loaded) -> None:
    def interrupted(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr("memfit.engine.run", interrupted)
    code, out, err = invoke(monkeypatch, capsys, "run", "--prompt", "hi")
    assert code == 130 and err.strip().startswith("interrupted") and "Traceback" not in out + err


BENCH = ["bench", "--methods", "streaming", "--budgets", "0.5", "--tasks", "fidelity", "--context", "64",
         "--samples", "2", "--batch-size", "1"]


def test_ctrl_c_during_bench_keeps_results_whole_and_resumes(monkeypatch, capsys, tmp_path, tiny_loaded) -> None:
    import memfit.bench.runner as runner

    out_dir = tmp_path / "out"
    real_append = runner.append_row

    def append_then_interrupt(path: Path | str, row: Any) -> None:
        real_append(path, row)
        raise KeyboardInterrupt  # Ctrl-C right after the first row (the full-cache reference) is written

    monkeypatch.setattr(runner, "append_row", append_then_interrupt)
    code, _, err = invoke(monkeypatch, capsys, *BENCH, "--out", str(out_dir))
    assert code == 130 and "Traceback" not in err
    assert f"every finished row is in {out_dir / 'results.jsonl'}" in err.strip().splitlines()[-1]
    lines = (out_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["method"] == "full"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written outside --out

    monkeypatch.setattr(runner, "append_row", real_append)
    code, out, err = invoke(monkeypatch, capsys, *BENCH, "--out", str(out_dir))
    assert code == 0, err
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["full", "streaming"]  # resumed: the reference is not written twice
    assert "1 new rows, 1 already done" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    table = out.splitlines()
    assert any(line.startswith("method") and line.rstrip().endswith("top-1 %") for line in table)  # whole headers


# -- units and tables ----------------------------------------------------------------------------------------------
def test_one_byte_formatter_in_binary_units() -> None:
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(5 * 1024**2) == "5.0 MiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert format_bytes(None) == "–"


def test_plain_table_keeps_every_header() -> None:
    text = plain_table(("method", "a long header"), [("snapkv@0.25", "1"), ("h2o", "12.5")])
    head, rule, *rows = text.splitlines()
    assert head.split("  ")[0].strip() == "method" and head.endswith("a long header")
    assert len(rule) == len(head) and rows[1].endswith("12.5")


# -- memfit methods: every parameter says what it means and which values it takes ------------------------------------
DOCUMENTED = ["snapkv", "h2o", "streaming", "tova", "kivi", "gear", "vidkv", "gemfilter", "keyformer", "scissorhands",
              "windowkv"]


def test_methods_json_describes_every_parameter(monkeypatch, capsys) -> None:
    from memfit.core.method import all_methods

    code, out, _ = invoke(monkeypatch, capsys, "methods", "--json")
    assert code == 0
    listed = {m["name"]: m for m in json.loads(out)}
    for name in DOCUMENTED:
        for key, p in listed[name]["params"].items():
            assert p["help"] and p["allowed"], f"{name}.{key}: add it to {name}'s param_help"
    for name, cls in all_methods().items():  # a class that documents its parameters documents them all
        if getattr(cls, "param_help", None):
            assert set(cls.param_help) == set(listed[name]["params"]), name
    assert listed["snapkv"]["params"]["pooling"]["allowed"] == "max | avg"
    code, text, _ = invoke(monkeypatch, capsys, "methods")
    assert code == 0 and "pooling=max" in text and "max | avg" in text and "<eviction>+<quantizer>" in text


# -- the README's commands --------------------------------------------------------------------------------------------
def readme_commands() -> list[list[str]]:
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", readme, flags=re.S | re.M):
        for line in block.splitlines():
            line = line.split("&&")[-1].strip()
            if line.startswith("memfit "):
                args = shlex.split(line, comments=True)[1:]
                commands.append(args[: args.index("<")] if "<" in args else args)
    return commands


def test_readme_commands_parse(monkeypatch, capsys) -> None:
    """Every `memfit ...` line of the README names options that exist (parsed up to --help: nothing runs)."""
    commands = readme_commands()
    assert len(commands) >= 10
    for args in commands:
        code, out, err = invoke(monkeypatch, capsys, *args, "--help")
        assert code == 0 and "Usage: memfit" in out, (args, err)


def test_example_document_ships_with_the_package() -> None:
    from memfit.data import example_path, example_text

    text = example_text()
    assert example_path().is_file() and text.rstrip().endswith("?") and "Samuel Okoro" in text


def test_bench_context_past_the_window_is_refused(monkeypatch, capsys, tmp_path, tiny_loaded) -> None:
    args = ["bench", "--methods", "streaming", "--budgets", "0.5", "--tasks", "fidelity", "--samples", "1"]
    code, out, err = invoke(monkeypatch, capsys, *args, "--context", str(WINDOW + 1), "--out", str(tmp_path / "o"))
    assert code == 2 and f"context window ({WINDOW:,} positions)" in one_error_line(err)
    assert not (tmp_path / "o").exists()
