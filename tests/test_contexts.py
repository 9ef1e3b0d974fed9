"""Reusable compressed contexts (memfit.contexts, `memfit compress` / `memfit run --kv`): a saved and reloaded
context answers exactly as the same cache kept in memory, is never changed by answering, and every bad file is one
clear error."""

from __future__ import annotations

import json
import struct
import sys

import pytest
import torch
from conftest import tiny_llama, tiny_qwen
from safetensors.torch import load_file, save_file

from memfit.api import make_cache
from memfit.contexts import CompressedContext, ContextFileError, compress_ids
from memfit.engine import generate, pad_left, prefill

# tiny models have head dim 16: quantizer groups must divide it
CASES = [
    ("snapkv", 0.3, None, "uniform"),
    ("streaming", 24, None, "uniform"),  # evicts during the question and decoding too
    ("h2o", 0.4, None, "uniform"),  # per-token scores in extras
    ("keyformer", 0.3, None, "uniform"),  # per-sequence state on the method itself
    ("kvzip", 0.3, {"chunk": 16}, "uniform"),  # the two-pass engine path (reconstruction chunks)
    ("snapkv+kivi", 0.5, {"kivi.group_size": 16, "kivi.residual": 16}, "uniform"),  # packed codes + residual
    # KVzip's two-pass choice stored in 4-bit KIVI codes (a question-outside context at ~1/14 of fp32 bytes)
    ("kvzip+kivi", 0.5, {"kvzip.chunk": 16, "kivi.bits": 4, "kivi.group_size": 16, "kivi.residual": 16}, "uniform"),
    ("snapkv", 0.3, None, "adakv"),  # ragged store
    ("kvzip", 0.3, {"chunk": 16}, "adakv"),  # one ranking over layers, heads split by score (ragged store)
    # the same choice in 4-bit codes under per-head budgets (ragged quantized store)
    ("kvzip+kivi", 0.5, {"kvzip.chunk": 16, "kivi.bits": 4, "kivi.group_size": 16, "kivi.residual": 16}, "adakv"),
]


def _doc_and_question(seed: int = 0) -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (70,), generator=g).tolist(), torch.randint(0, 128, (1, 6), generator=g)


def _tensors(ctx: CompressedContext) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif hasattr(x, "__dict__"):
            walk(vars(x))

    walk(ctx._layers)
    return found


@pytest.mark.parametrize("method, budget, params, allocation", CASES)
def test_saved_context_answers_like_the_cache_in_memory(tmp_path, method, budget, params, allocation):
    """Reference: prefill the document with the method, then the question on top, then decode — one process, no file.
    The saved and reloaded context must give the same kept tokens, bit-identical logits and the same answer."""
    model = tiny_llama()
    doc, question = _doc_and_question()
    with torch.no_grad():
        ref = make_cache(model, method, budget, params, allocation=allocation)
        d = torch.tensor([doc])
        prefill(model, d, torch.ones_like(d), ref)
        kept = [layer.valid_mask().sum().item() for layer in ref.core.layers]
        ref_bytes = ref.nbytes()
        ref_keys = [layer.keys.clone() for layer in ref.core.layers]
        want = generate(model, question, torch.ones_like(question), ref, max_new_tokens=6)

        ctx = compress_ids(model, None, doc, method, budget, params, allocation)
        path = ctx.save(tmp_path / "doc.mfkv")
        loaded = CompressedContext.load(path, model)
        cache = loaded.cache()
        assert cache.nbytes() == ref_bytes == ctx.info["kv_bytes_held"]
        assert [layer.valid_mask().sum().item() for layer in cache.core.layers] == kept
        for layer, keys in zip(cache.core.layers, ref_keys, strict=True):
            assert torch.equal(layer.keys, keys)
        got = generate(model, question, torch.ones_like(question), cache, max_new_tokens=6)
    assert got.tokens == want.tokens
    assert torch.equal(got.first_logits, want.first_logits)


@pytest.mark.parametrize("method, budget, params", [("streaming", 24, None), ("h2o", 0.4, None),
                                                    ("snapkv+kivi", 0.5, {"kivi.group_size": 16, "kivi.residual": 16})])
def test_answering_never_changes_the_context(method, budget, params):
    """Many questions, interleaved as concurrent requests would be: each request's copy answers as if alone and the
    context's tensors keep their exact bytes."""
    model = tiny_llama()
    doc, q1 = _doc_and_question(1)
    q2 = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        ctx = compress_ids(model, None, doc, method, budget, params)
        before = [t.clone() for t in _tensors(ctx)]
        alone = [generate(model, q, torch.ones_like(q), ctx.cache(), max_new_tokens=5) for q in (q1, q2)]
        # two requests in flight at once: step them alternately through their own copies
        from memfit.adapters.transformers import forward
        from memfit.engine import positions_from_mask

        caches = [ctx.cache(), ctx.cache()]
        toks: list[list[int]] = [[], []]
        state = []
        for cache, q in zip(caches, (q1, q2), strict=True):
            mask = torch.cat([torch.ones(1, ctx.seen, dtype=torch.long), torch.ones_like(q)], dim=1)
            pos = positions_from_mask(torch.ones_like(q)) + ctx.seen
            state.append([forward(model, q, mask, cache, pos, logits_to_keep=1)[:, -1], mask, pos[:, -1:]])
        for _ in range(5):
            for i, cache in enumerate(caches):
                logits, mask, last = state[i]
                tok = logits.argmax(-1)
                toks[i].append(int(tok))
                mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
                state[i] = [forward(model, tok[:, None], mask, cache, last + 1, logits_to_keep=1)[:, -1], mask, last + 1]
    assert [t[:5] for t in toks] == [a.tokens[0][:5] for a in alone]
    after = _tensors(ctx)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)


def test_a_batch_of_questions_answers_each_as_alone():
    model = tiny_llama()
    doc, _ = _doc_and_question(2)
    qs = [torch.randint(0, 128, (n,)).tolist() for n in (5, 9)]
    with torch.no_grad():
        ctx = compress_ids(model, None, doc, "snapkv", 0.3)
        ids, mask = pad_left(qs)
        batch = generate(model, ids, mask, ctx.cache(batch=2), max_new_tokens=4)
        for i, q in enumerate(qs):
            one = torch.tensor([q])
            alone = generate(model, one, torch.ones_like(one), ctx.cache(), max_new_tokens=4)
            assert batch.tokens[i] == alone.tokens[0]
            torch.testing.assert_close(batch.first_logits[i], alone.first_logits[0], atol=1e-5, rtol=1e-5)
        from memfit.errors import ConfigError

        with pytest.raises(ConfigError, match="one copy per prompt"):
            generate(model, ids, mask, ctx.cache(), max_new_tokens=1)


# -- bad files -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_llama()
    doc, _ = _doc_and_question(3)
    with torch.no_grad():
        ctx = compress_ids(model, None, doc, "snapkv+kivi", 0.5, {"kivi.group_size": 16, "kivi.residual": 16})
    return model, ctx.save(tmp_path_factory.mktemp("ctx") / "doc.mfkv")


def _rewrite_metadata(src, dst, **changes):
    tensors = load_file(str(src))
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(tensors, str(dst), metadata=meta)


def _damage(path, dst, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    elif how == "flipped":  # one bit in the tensor data (after the 8-byte length and the JSON header)
        header = struct.unpack("<Q", bytes(data[:8]))[0]
        data[8 + header + (len(data) - 8 - header) // 2] ^= 0x10
    elif how == "header":
        data[20] = ord("}")
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("how, message", [("truncated", "truncated or damaged"), ("flipped", "checksum"),
                                          ("header", "not a memfit context file")])
def test_damaged_file_is_a_clear_error(saved, tmp_path, how, message):
    model, path = saved
    with pytest.raises(ContextFileError, match=message):
        CompressedContext.load(_damage(path, tmp_path / "bad.mfkv", how), model)


def test_other_model_future_format_and_foreign_files(saved, tmp_path):
    model, path = saved
    with pytest.raises(ContextFileError, match="other weights"):
        CompressedContext.load(path, tiny_llama(seed=1))
    with pytest.raises(ContextFileError, match="another model"):
        CompressedContext.load(path, tiny_qwen())  # another architecture: its config differs
    future = tmp_path / "future.mfkv"
    _rewrite_metadata(path, future, version="2")
    with pytest.raises(ContextFileError, match="newer than this memfit"):
        CompressedContext.load(future, model)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ContextFileError, match="not a memfit context file"):
        CompressedContext.load(foreign, model)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ContextFileError, match="not a memfit context file"):
        CompressedContext.load(text, model)
    with pytest.raises(ContextFileError, match="no context file"):
        CompressedContext.load(tmp_path / "missing.mfkv", model)
    # a consistent header whose state does not fit its method's stores (hand-made file): damaged, not a crash
    hacked = tmp_path / "hacked.mfkv"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    body = json.loads(meta["header"])
    body["info"]["method"], body["info"]["params"] = "snapkv", {}  # dense stores cannot take the quantized state
    from memfit.contexts import _checksum

    tensors = load_file(str(path))
    meta["header"] = json.dumps(body, sort_keys=True)
    meta["checksum"] = _checksum(meta["header"], tensors)
    save_file(tensors, str(hacked), metadata=meta)
    with pytest.raises(ContextFileError, match="damaged or does not fit"):
        CompressedContext.load(hacked, model)


# -- the CLI on the default model ------------------------------------------------------------------------------------
DOC = ("Harbor log. The ferry Mirela left the north pier at dawn with forty crates of lemons. The harbor master, "
       "Ines Varga, noted that the crane on dock three was broken. The secret passkey is 48213. The weather was calm "
       "and the ferry reached the island before noon, where the lemons were sold at the market.")


def _cli(monkeypatch, capsys, *args):
    from memfit.cli import main

    monkeypatch.setattr(sys, "argv", ["memfit", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.model
def test_cli_compress_then_run_kv_matches_the_in_process_reference(monkeypatch, capsys, tmp_path, default_model):
    model, tok = default_model
    doc_file = tmp_path / "doc.txt"
    doc_file.write_text(DOC)
    out = tmp_path / "doc.mfkv"
    code, stdout, err = _cli(monkeypatch, capsys, "compress", "--method", "kvzip", "--budget", "0.5",
                             "--prompt-file", str(doc_file), "-o", str(out), "--json")
    assert code == 0, err
    made = json.loads(stdout)
    assert made["kv_bytes_held"] < made["kv_bytes_full"]
    question = "What is the secret passkey? Answer with the number only."
    code, stdout, err = _cli(monkeypatch, capsys, "run", "--kv", str(out), "--prompt", question,
                             "--max-new-tokens", "14", "--json")
    assert code == 0, err
    answer = json.loads(stdout)
    # reference in one process: the same document ids prefilled with the method, then the question, then decode
    from memfit.contexts import compress

    ctx = compress(DOC, (model, tok), "kvzip", 0.5)
    ids = torch.tensor([ctx.document_ids])
    ref = make_cache(model, "kvzip", 0.5)
    ref.method.bind_tokenizer(tok)
    with torch.no_grad():
        prefill(model, ids, torch.ones_like(ids), ref)
        q_ids, q_mask = ctx.encode_questions([question])
        gen = generate(model, q_ids, q_mask, ref, max_new_tokens=14, eos_token_ids=[tok.eos_token_id])
    assert answer["text"] == tok.decode(gen.tokens[0], skip_special_tokens=True)
    assert answer["kv_bytes_held"] >= made["kv_bytes_held"]
    assert "48213" in answer["text"]  # kept at half the bytes, asked outside the compressed context


@pytest.mark.model
def test_cli_bad_context_files_are_one_error_line(monkeypatch, capsys, tmp_path, saved):
    _, tiny_file = saved
    future = tmp_path / "future.mfkv"
    _rewrite_metadata(tiny_file, future, version="9")
    cases = [
        (["run", "--kv", str(tiny_file), "--prompt", "q"], "another model"),
        (["run", "--kv", str(_damage(tiny_file, tmp_path / "t.mfkv", "truncated")), "--prompt", "q"], "truncated"),
        (["run", "--kv", str(future), "--prompt", "q"], "newer than this memfit"),
        (["run", "--kv", str(tmp_path / "none.mfkv"), "--prompt", "q"], "no context file"),
        (["run", "--kv", str(tiny_file), "--method", "snapkv", "--prompt", "q"], "cannot be used with --kv"),
        (["compress", "--method", "kvzip", "--budget", "0.5", "--prompt", "x", "-o", str(tmp_path)], "is a folder"),
    ]
    for args, expected in cases:
        code, out, err = _cli(monkeypatch, capsys, *args)
        # (the model's loading progress bar may precede the error; nothing else may)
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "Loading weights" not in line]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, err)
        assert "Traceback" not in out + err


class _Pieces:
    """A tokenizer stand-in for span ids: token i reads as a digit when i % 4 == 1 (digit runs), else a new word."""

    all_special_ids: list[int] = []
    chat_template = None

    def convert_ids_to_tokens(self, ids):
        return [str(i % 10) if i % 4 == 1 else f"Ġw{i}" for i in ids]

    def __call__(self, text, add_special_tokens=False):  # KVzip words its reconstruction prompt with it
        return {"input_ids": [ord(c) % 128 for c in text]}


@pytest.mark.parametrize("method, params, allocation", [
    ("kvzip", {"chunk": 16}, "adakv"),
    ("kvzip+kivi", {"kvzip.chunk": 16, "kivi.bits": 4, "kivi.group_size": 16, "kivi.residual": 16}, "uniform"),
])
def test_compress_keeps_whole_spans_by_default_and_the_file_keeps_them(tmp_path, method, params, allocation):
    """`compress` follows `memfit run`'s spans default (auto: on for an eviction with a budget); the span ids are
    held (and counted) like any per-token state, so the saved context answers as the one in memory; off: no ids."""
    from memfit.core.spans import SPAN_KEY

    model = tiny_llama()
    doc, question = _doc_and_question(2)
    doc = [1 + 4 * (i % 3) if 20 <= i < 44 else t for i, t in enumerate(doc)]  # digit runs
    with torch.no_grad():
        on = compress_ids(model, _Pieces(), doc, method, 0.3, params, allocation)
        off = compress_ids(model, _Pieces(), doc, method, 0.3, params, allocation, spans="off")
        assert on.info["spans"] and not off.info["spans"]
        assert all(SPAN_KEY in layer.extras for layer in on.cache().core.layers)
        assert all(SPAN_KEY not in layer.extras for layer in off.cache().core.layers)
        want = generate(model, question, torch.ones_like(question), on.cache(), max_new_tokens=6)
        loaded = CompressedContext.load(on.save(tmp_path / "doc.mfkv"), model)
        assert loaded.nbytes() == on.info["kv_bytes_held"]
        got = generate(model, question, torch.ones_like(question), loaded.cache(), max_new_tokens=6)
    assert got.tokens == want.tokens and torch.equal(got.first_logits, want.first_logits)
