"""Compressed linear layers (memfit.weights): reference matmul, exact bytes, methods, save/reload, clear errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import held_tensors, tiny_llama, tiny_qwen
from torch import nn

import memfit.weights.format as fmt
from memfit.errors import ConfigError, ModelLoadError
from memfit.weights import CompressedLinear, model_weight_bytes, parse_weight_spec, quantize_model
from memfit.weights.format import MATVEC_ROWS, pack_bits, unpack_bits
from memfit.weights.io import MANIFEST, load_quantized, save_quantized
from memfit.weights.quantizer import minmax_params, rtn_quantize

SPECS = [
    "rtn:4:group_size=32",
    "rtn:3:group_size=16",
    "slim-llm:3:group_size=16:grid=4",
    "gqsa:4",
    "svdquant:3:group_size=16:rank=4:iters=2",
    "flash-llm:sparsity=0.6",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", pad_token="w1", eos_token="w2")
    tok.padding_side = "left"
    return tok


def calib() -> torch.Tensor:
    return torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def small_bands(monkeypatch):
    """Force several row bands (and several Flash-LLM tile rows) per layer in the reference matmul."""
    monkeypatch.setattr(fmt, "_BAND_WEIGHTS", 128 * 64)


def test_pack_roundtrip_every_width():
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        codes = torch.randint(0, 2**bits, (5, 3, 16), generator=g)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 16 * bits // 8)
        assert torch.equal(unpack_bits(packed, bits, 16).long(), codes)


def _layers() -> dict[str, CompressedLinear]:
    """One layer per storage format, with shapes that are not multiples of the group, band or tile sizes."""
    g = torch.Generator().manual_seed(0)
    out, inf = 300, 200
    w = torch.randn(out, inf, generator=g)
    bias = torch.randn(out, generator=g)
    layers = {}
    gbits = torch.tensor([2, 3, 4, 3], dtype=torch.uint8)  # 4 groups of 64 (200 columns, last group padded)
    c, s, o = rtn_quantize(w, gbits, 64)
    layers["group"] = CompressedLinear.from_group(c, s, o, gbits, inf, bias)
    gb = torch.full((-(-inf // 16),), 4, dtype=torch.uint8)
    c, s, o = rtn_quantize(w, gb, 16)
    keep = torch.rand(out, gb.numel(), generator=g) > 0.5
    keep[7] = False  # a row with no kept block
    layers["group_sparse"] = CompressedLinear.from_group_sparse(c, s, o, keep, 4, inf, bias)
    layers["tiled_csl"] = CompressedLinear.from_tiled_csl(torch.where(w.abs() > 1, w, 0), bias)
    c, s, o = rtn_quantize(w, gbits, 64)
    layers["group+lowrank"] = CompressedLinear.from_group(c, s, o, gbits, inf, None).add_lowrank(
        torch.randn(out, 5, generator=g), torch.randn(5, inf, generator=g)
    )
    return layers


@pytest.mark.parametrize("name", ["group", "group_sparse", "tiled_csl", "group+lowrank", "group uniform"])
@pytest.mark.parametrize("lead", [(2, 3), (3, 4)], ids=["decode rows", "prefill rows"])
def test_reference_matmul_equals_dequantize_then_matmul(name, lead):
    """Both forms of the reference (a few rows: codes times x without a dequantized weight; more rows:
    dequantize a band, then multiply) equal dequantize-then-matmul, for mixed and uniform widths."""
    if name == "group uniform":
        w = torch.randn(300, 200, generator=torch.Generator().manual_seed(5))
        gbits = torch.full((4,), 4, dtype=torch.uint8)
        layer = CompressedLinear.from_group(*rtn_quantize(w, gbits, 64), gbits, 200)
    else:
        layer = _layers()[name]
    assert layer.band_rows() < layer.out_features  # several bands really ran
    x = torch.randn(*lead, layer.in_features, generator=torch.Generator().manual_seed(2))
    assert (x[..., 0].numel() <= MATVEC_ROWS) == (lead == (2, 3))
    w = layer.dequantize()
    expected = x @ w.T + (layer.bias if layer.bias is not None else 0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_formats_decode_what_was_stored():
    layers = _layers()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)
    sparse = torch.where(w.abs() > 1, w, 0)
    assert torch.equal(layers["tiled_csl"].dequantize(), sparse.half().float())  # fp16 values at their positions
    dense = layers["group"].dequantize()
    blocks = layers["group_sparse"].dequantize().view(300, -1)
    assert torch.all(blocks[7] == 0)
    # every group at its own width: the error is at most half a step (plus fp16 rounding of scale and offset)
    gbits = [2, 3, 4, 3]
    for gi, b in enumerate(gbits):
        cols = slice(gi * 64, min((gi + 1) * 64, 200))
        step = (w[:, cols].amax(1) - w[:, cols].amin(1)) / (2**b - 1)
        assert torch.all((dense[:, cols] - w[:, cols]).abs() <= step[:, None] * 0.5 + 2e-2)


def test_weight_bytes_are_the_held_tensors_and_the_packed_size():
    for name, layer in _layers().items():
        walked = sum(t.numel() * t.element_size() for t in held_tensors(layer).values())
        assert layer.weight_bytes == walked, name
    group = _layers()["group"]
    # 300 rows x (64 * (2 + 3 + 4 + 3) / 8 code bytes) + fp16 scale and offset per group + 4 widths + fp32 bias
    assert group.weight_bytes == 300 * 64 * 12 // 8 + 300 * 4 * 2 * 2 + 4 + 300 * 4
    tiled = _layers()["tiled_csl"]
    nnz = int(tiled.values.numel())
    n_tiles = 3 * 4  # ceil(300/128) x ceil(200/64)
    assert tiled.weight_bytes == 4 * nnz + 4 * (n_tiles + 1) + 300 * 4


def test_rtn_equals_an_independent_fake_quant():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 96, generator=g)
    layer = parse_weight_spec("rtn:3:group_size=32").compress(_lin(w), None)
    groups = w.view(40, 3, 32)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale, off = ((hi - lo) / 7).half().float(), lo.half().float()
    q = torch.clamp(torch.round((groups - off[..., None]) / scale[..., None]), 0, 7)
    torch.testing.assert_close(layer.dequantize(), (q * scale[..., None] + off[..., None]).view(40, 96))
    s, o = minmax_params(groups, 3)
    assert torch.equal(s, scale) and torch.equal(o, off)


def _lin(w: torch.Tensor, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    lin.weight.data.copy_(w)
    return lin


def test_slim_llm_keeps_the_average_width_and_beats_rtn_on_its_own_objective():
    from memfit.weights.calibrate import LinearStats
    from memfit.weights.methods.slim_llm import allocate_bits, output_kl

    sal = torch.tensor([5.0, 1.0, 3.0, 9.0, 2.0, 7.0])
    for k in range(3):
        bits = allocate_bits(sal, 3, k)
        assert bits.float().mean() == 3
    assert allocate_bits(sal, 3, 1).tolist() == [3, 2, 3, 4, 3, 3]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 128, generator=g) * torch.linspace(0.1, 3, 128)  # uneven input channels
    w = torch.randn(64, 128, generator=g)
    stats = LinearStats(128)
    stats.add(x)
    slim = parse_weight_spec("slim-llm:2:group_size=16").compress(_lin(w), stats)
    rtn = parse_weight_spec("rtn:2:group_size=16").compress(_lin(w), None)
    assert slim.group_bits.float().mean() == 2
    assert slim.weight_bytes == rtn.weight_bytes  # same average width, same bytes
    assert output_kl(x, w, slim.dequantize()) < output_kl(x, w, rtn.dequantize())


def test_svdquant_residual_by_gptq_lowers_the_output_error_at_the_same_bytes():
    """With calibration statistics the residual W - L1 L2 is quantized by GPTQ: the layer's output error on the
    calibration inputs falls below the RTN residual's (`gptq=false`), the bytes stay those of the spec."""
    from memfit.weights.calibrate import LinearStats

    g = torch.Generator().manual_seed(6)
    x = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)  # correlated input channels
    w = torch.randn(64, 128, generator=g)
    stats = LinearStats(128)
    stats.add(x)
    by_gptq = parse_weight_spec("svdquant:3:group_size=32:rank=4").compress(_lin(w), stats)
    by_rtn = parse_weight_spec("svdquant:3:group_size=32:rank=4:gptq=false").compress(_lin(w), stats)
    uncalibrated = parse_weight_spec("svdquant:3:group_size=32:rank=4").compress(_lin(w), None)
    assert by_gptq.weight_bytes == by_rtn.weight_bytes == uncalibrated.weight_bytes
    # an RTN residual reads no statistics, so quantize_model skips the calibration pass for it
    assert parse_weight_spec("svdquant:3").needs_calibration()
    assert not parse_weight_spec("svdquant:3:gptq=false").needs_calibration()
    torch.testing.assert_close(by_rtn.dequantize(), uncalibrated.dequantize())  # no statistics: no GPTQ
    out_err = [float((x @ (layer.dequantize() - w).T).norm()) for layer in (by_gptq, by_rtn)]
    assert out_err[0] < 0.9 * out_err[1], out_err


def test_more_bits_less_error():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    errs = [
        float((parse_weight_spec(f"rtn:{b}:group_size=32").compress(_lin(w), None).dequantize() - w).norm())
        for b in (2, 3, 4, 8)
    ]
    assert errs == sorted(errs, reverse=True)
    svd = [float((parse_weight_spec(f"svdquant:3:group_size=32:rank={r}").compress(_lin(w), None).dequantize() - w)
                 .norm()) for r in (1, 16)]
    assert svd[1] < svd[0] < errs[1]  # the low-rank branch helps, more with a higher rank


@pytest.mark.parametrize(
    "spec, make",
    [(s, tiny_llama) for s in SPECS] + [(SPECS[2], tiny_qwen), (SPECS[4], tiny_qwen)],
    ids=[f"llama-{s}" for s in SPECS] + [f"qwen2-{SPECS[2]}", f"qwen2-{SPECS[4]}"],
)
def test_quantize_save_reload_identical_logits(tmp_path, spec, make):
    torch.manual_seed(0)
    model = make()
    if make is tiny_llama:  # a tied head is saved once and re-tied
        model.lm_head.weight = model.model.embed_tokens.weight
    dense = model_weight_bytes(model)
    quantize_model(model, spec, calib_ids=calib())
    assert all(not isinstance(m, nn.Linear) or m is model.lm_head for m in model.modules())
    assert model_weight_bytes(model) < dense
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, tiny_tokenizer(), tmp_path / "q")
    from memfit.models import load_model

    again, tok = load_model(tmp_path / "q", progress=False)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)
    assert model_weight_bytes(again) == model_weight_bytes(model)
    assert again.memfit_weights == parse_weight_spec(spec).spec()
    if make is tiny_llama:
        assert again.lm_head.weight is again.model.embed_tokens.weight


@pytest.fixture(scope="module")
def bqpo_blocks():
    """A tiny Llama quantized by GQSA block by block, running BQPO through the driver's hook and recording for each
    block the output error (fresh, and as `bqpo` reports it) and its layers' packed state before and after."""
    from memfit.weights.calibrate import quantize_blockwise
    from memfit.weights.methods.gqsa import GQSA, bqpo

    model, method, seen = tiny_llama(), GQSA(bits=4, bqpo_epochs=0), []

    def state(block):
        return {n: {k: v.clone() for k, v in m.named_buffers()} for n, m in block.named_modules()
                if isinstance(m, CompressedLinear)}

    def refine(block, inputs, targets, forward):
        rows = torch.arange(inputs.shape[0])
        err = lambda: float((forward(inputs, rows) - targets).pow(2).mean())  # noqa: E731
        first, old = err(), state(block)
        before, after = bqpo(block, inputs, targets, forward, epochs=10, lr=1e-3, quant_lr=1e-3, batch=1)
        seen.append({"first": first, "before": before, "after": after, "last": err(), "old": old, "new": state(block)})

    with torch.no_grad():
        quantize_blockwise(model, calib(), lambda _n, lin, st: method.compress(lin, st), refine=refine)
    return seen


def test_gqsa_bqpo_lowers_each_blocks_output_error_on_the_calibration_data(bqpo_blocks):
    assert len(bqpo_blocks) == 3
    for b in bqpo_blocks:
        assert b["before"] == pytest.approx(b["first"], rel=1e-5)  # training starts from the GPTQ solution
        assert b["last"] == pytest.approx(b["after"], rel=1e-4)  # the re-encoded layers are what was trained
        assert b["after"] < 0.9 * b["before"]


def test_gqsa_bqpo_keeps_the_mask_and_the_bytes(bqpo_blocks):
    changed = 0
    for b in bqpo_blocks:
        assert b["old"].keys() == b["new"].keys() and len(b["old"]) == 7
        for name, old in b["old"].items():
            new = b["new"][name]
            assert torch.equal(old["row_ptr"], new["row_ptr"]) and torch.equal(old["group_idx"], new["group_idx"])
            assert old.keys() == new.keys()
            assert all(old[k].shape == new[k].shape and old[k].dtype == new[k].dtype for k in old)  # same bytes
            changed += not torch.equal(old["codes"], new["codes"]) or not torch.equal(old["scales"], new["scales"])
    assert changed > 15  # training moved (nearly) every layer


def test_weights_compose_with_a_kv_method():
    from memfit.engine import run

    model, tok = tiny_llama(), tiny_tokenizer()
    prompt = " ".join(f"w{3 + i % 100}" for i in range(60))
    res = run(prompt, model=(model, tok), method="snapkv", budget=0.5, max_new_tokens=3, chat=False,
              weights="gqsa:3")
    assert res.weights == "gqsa:3"
    assert res.weight_bytes == model_weight_bytes(model) and res.kv_bytes_held < res.kv_bytes_full
    assert any(isinstance(m, CompressedLinear) for m in model.modules())


@pytest.mark.parametrize(
    "spec, message",
    [
        ("rtn:9", "from 1 to 8"),
        ("rtn:x", "bits must be an integer"),
        ("nope:3", "unknown weight method"),
        ("rtn:4:group_size=12", "multiple of 8"),
        ("gqsa:4:sparsity=1.5", "sparsity"),
        ("gqsa:4:bqpo_epochs=-1", "bqpo_epochs must be >= 0"),
        ("gqsa:4:bqpo_lr=0", "bqpo_lr must be a positive learning rate"),
        ("gqsa:4:bqpo_quant_lr=-1e-3", "bqpo_quant_lr must be a positive learning rate"),
        ("gqsa:4:bqpo_batch=0", "bqpo_batch must be >= 1"),
        ("flash-llm:4", "takes no bits"),
        ("rtn:4:foo=1", "unknown parameter"),
    ],
)
def test_bad_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_weight_spec(spec)


def test_a_model_without_linear_layers_is_a_clear_error():
    with pytest.raises(ConfigError, match="no linear layers to quantize"):
        quantize_model(nn.Sequential(nn.Embedding(10, 4)), "rtn:4")


def _saved(tmp_path):
    model = tiny_llama()
    quantize_model(model, "rtn:4:group_size=32")
    return save_quantized(model, tiny_tokenizer(), tmp_path / "q")


def test_corrupt_or_foreign_folders_are_clear_errors(tmp_path):
    folder = _saved(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        load_quantized(folder)
    (folder / MANIFEST).write_text(json.dumps({**manifest, "format": "gptq"}))
    with pytest.raises(ModelLoadError, match="not a memfit-weights manifest"):
        load_quantized(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="model.safetensors cannot be read"):
        load_quantized(folder)


def test_missing_tensor_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="does not match the architecture"):
        load_quantized(folder)


def _cli(monkeypatch, capsys, *args):
    from memfit.cli import main

    monkeypatch.setattr(sys, "argv", ["memfit", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_errors_are_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = _cli(monkeypatch, capsys, "quantize", "--method", "rtn", "--bits", "9", "--out", str(tmp_path / "o"))
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1 and "1 to 8" in err
    code, _, err = _cli(monkeypatch, capsys, "run", "--weights", "slim-llm:0", "--prompt", "hi")
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    folder = _saved(tmp_path)
    (folder / MANIFEST).write_text("[]")
    code, _, err = _cli(monkeypatch, capsys, "run", "--model", str(folder), "--prompt", "hi")
    assert code == 2 and err.startswith("error:") and "memfit-quantized folder" in err


def test_methods_lists_weight_methods(monkeypatch, capsys):
    code, out, _ = _cli(monkeypatch, capsys, "methods", "--json")
    families = {d["name"]: d["family"] for d in json.loads(out)}
    for name in ("rtn", "slim-llm", "gqsa", "svdquant", "flash-llm"):
        assert families[name].startswith("weights")


def test_cli_quantize_then_run_the_saved_folder(monkeypatch, capsys, tmp_path):
    src = tmp_path / "tiny"
    model = tiny_llama()
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    code, out, err = _cli(monkeypatch, capsys, "quantize", "--model", str(src), "--method", "gqsa", "--bits", "3",
                          "--calib-tokens", "256", "--out", str(tmp_path / "q"), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["weights"] == "gqsa:3" and info["weight_bytes"] < info["weight_bytes_before"]
    prompt = " ".join(f"w{3 + i % 100}" for i in range(40))
    code, out, err = _cli(monkeypatch, capsys, "run", "--model", str(tmp_path / "q"), "--method", "snapkv",
                          "--budget", "0.5", "--no-chat", "--max-new-tokens", "2", "--prompt", prompt, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["weights"] == "gqsa:3" and res["weight_bytes"] == info["weight_bytes"]
    n_linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1  # all but the head
    assert res["weight_kernels"] == {"reference": n_linears}  # a CPU: every layer multiplies in plain PyTorch
    code, _, err = _cli(monkeypatch, capsys, "quantize", "--model", str(src), "--method", "rtn",
                        "--out", str(tmp_path / "q"))
    assert code == 2 and "not an empty folder" in err


def test_bench_rows_name_the_weights(tmp_path):
    from memfit.bench.runner import run_bench

    res = run_bench((tiny_llama(), tiny_tokenizer()), methods=["snapkv"], budgets=[0.5], tasks=["fidelity"],
                    context=128, samples=1, out=tmp_path, weights="rtn:4:group_size=32", progress=False,
                    model_name="tiny")
    assert {r["model"] for r in res.rows} == {"tiny [weights rtn:4:group_size=32]"}
    with pytest.raises(ConfigError, match="unknown weight method"):
        run_bench((tiny_llama(), tiny_tokenizer()), methods=["snapkv"], out=tmp_path / "b", weights="nope:3")
