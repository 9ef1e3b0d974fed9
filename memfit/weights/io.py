"""Saving and loading memfit-quantized model folders.

A folder written by `save_quantized` (``memfit quantize --out DIR``) holds::

    config.json, generation_config.json, tokenizer files     as saved by transformers
    model.safetensors                                        every tensor: compressed layers' packed buffers
                                                             under ``<module>.<buffer>``, the rest of the model's
                                                             parameters and persistent buffers by state-dict name
    memfit-weights.json                                      the manifest (written last)

The manifest says ``"format": "memfit-weights"``, its version, the method spec, and for every compressed layer
its format and shape metadata; tied tensors (an output head sharing the embedding) are listed as aliases and
saved once. `load_quantized` builds the architecture from config.json without allocating weights
(``accelerate.init_empty_weights``), puts a `CompressedLinear` where the manifest says, and assigns every tensor
from the file: the linear weights are never materialised densely. Anything missing, extra or mis-shaped is one
`ModelLoadError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit.errors import ModelLoadError
from memfit.weights.calibrate import set_module
from memfit.weights.format import FORMATS, CompressedLinear, model_weight_bytes

MANIFEST = "memfit-weights.json"
FORMAT_NAME = "memfit-weights"
VERSION = 1


def is_quantized_folder(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def save_quantized(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike[str], spec: str = "") -> Path:
    """Write ``model`` (with its `CompressedLinear` layers) and ``tokenizer`` to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a half-written folder must not look finished
    for module in model.modules():  # a folder holds memfit's own code order, whatever a GPU kernel reordered
        if isinstance(module, CompressedLinear):
            module.canonical_layout()
    layers = {n: {"fmt": m.fmt, "meta": m.meta} for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    tensors: dict[str, torch.Tensor] = {}
    by_ptr: dict[tuple[int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if t is None:
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in by_ptr:  # tied weights (e.g. lm_head = embed_tokens): save once
            aliases[name] = by_ptr[key]
            continue
        by_ptr[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    manifest = {
        "format": FORMAT_NAME,
        "version": VERSION,
        "spec": spec or getattr(model, "memfit_weights", ""),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "weight_bytes": model_weight_bytes(model),
        "layers": layers,
        "aliases": aliases,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _bad(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is not a usable memfit-quantized folder: {why}. Re-create it with `memfit quantize --out DIR`, "
        "or pass the original model."
    )


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise _bad(path, f"{MANIFEST} cannot be read ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise _bad(path, f"{MANIFEST} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != VERSION:
        raise _bad(path, f"manifest version {manifest.get('version')!r}, this memfit reads version {VERSION}")
    if not isinstance(manifest.get("layers"), dict):
        raise _bad(path, "the manifest lists no layers")
    return manifest


def load_quantized(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a folder written by `save_quantized` (model on CPU, eval mode)."""
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = Path(path)
    manifest = read_manifest(root)
    try:
        config = AutoConfig.from_pretrained(root)
        tok = AutoTokenizer.from_pretrained(root)
    except Exception as e:
        raise _bad(root, f"config or tokenizer cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    try:
        tensors = load_file(str(root / "model.safetensors"))
    except (OSError, SafetensorError, ValueError) as e:
        raise _bad(root, f"model.safetensors cannot be read ({e})") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    for name, info in manifest["layers"].items():
        if not isinstance(info, dict) or info.get("fmt") not in FORMATS:
            raise _bad(root, f"layer {name!r} has an unknown format")
        prefix = name + "."
        mine = {k[len(prefix) :]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix) and "." not in k[len(prefix) :]}
        bias = mine.pop("bias", None)
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise _bad(root, f"layer {name!r} does not exist in this architecture") from None
        meta = info.get("meta", {})
        if (getattr(old, "in_features", None), getattr(old, "out_features", None)) != (
            meta.get("in_features"),
            meta.get("out_features"),
        ):
            raise _bad(root, f"layer {name!r} has the wrong shape for this architecture")
        try:
            layer = CompressedLinear(info["fmt"], meta, mine, None if bias is None else bias.to(dtype))
        except (KeyError, TypeError, ValueError) as e:
            raise _bad(root, f"layer {name!r}: {e}") from None
        set_module(model, name, layer)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    expected = {k for k, v in model.state_dict().items() if not _in_compressed(model, k)}
    missing = expected - set(state) - set(manifest.get("aliases", {}))
    extra = set(state) - expected
    if missing or extra:
        what = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(extra)[:3]}"
        raise _bad(root, f"model.safetensors does not match the architecture ({what})")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise _bad(root, f"tensor shapes do not match the architecture ({str(e).splitlines()[0]})") from None
    for alias, source in manifest.get("aliases", {}).items():
        _assign(model, alias, _get(model, source))
    # init_empty_weights leaves buffers real (rotary tables are computed, not saved); parameters must all be set
    unset = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if unset:
        raise _bad(root, f"parameters missing from model.safetensors: {unset[:3]}")
    model.eval()
    model.memfit_weights = manifest.get("spec", "")
    return model, tok


def _in_compressed(model: nn.Module, key: str) -> bool:
    owner = key.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(owner), CompressedLinear)
    except AttributeError:
        return False


def _get(model: nn.Module, name: str) -> Any:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _assign(model: nn.Module, name: str, value: Any) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, value)
