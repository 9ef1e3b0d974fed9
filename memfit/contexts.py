"""Reusable compressed contexts: compress a document once, save its cache, answer many questions from it.

`compress(document, model, method, budget)` prefills the document with a method (eviction, quantization or both)
and returns a `CompressedContext`: the cache exactly as the stores hold it after prefill. `.save(path)` writes it as
one safetensors file (`.mfkv`); `CompressedContext.load(path, model)` reads it back for the same model;
`.cache()` gives a fresh `MemfitCache` that continues from the document, and `memfit.run(question, kv=ctx)` /
`engine.generate(..., cache=ctx.cache())` prefill the question on top of it (positions continue from the
document's logical length) and decode.

One context, many questions: `.cache()` builds new layer objects that *share* the context's tensors (no copy).
Stores never write into a tensor they hold — appending and evicting always build new tensors — so answering
never changes the context, and each concurrent request can take its own `.cache()` for free (tested).

File layout (format `memfit-kv`, version 1). Tensors: every tensor the stores hold, as they hold it (dense K/V,
validity, policy extras; a quantized store's packed codes, scales, zero points, lane map and residual; a ragged
store's packed and tail parts), named t0, t1, ...; a tensor held twice is stored once. Metadata: `format`,
`version`, `header` (JSON: the model's identity, method spec, parameters, budget, allocation, whether the chat
template framed the document, the document's token ids, logical length, per-row budgets, the stores' state tree
with tensor references) and `checksum` (sha256 over the header and every tensor's bytes), so a truncated or
corrupted file, a file from another model or from a newer memfit is one clear error, never a wrong answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from memfit.errors import ConfigError

FORMAT = "memfit-kv"
VERSION = 1
_SPLIT = "\x00memfit-question\x00"  # marker placed where the question goes when the chat template frames a document


class ContextFileError(ConfigError):
    """A context file that cannot be used (not a context file, damaged, another model, a newer format)."""


# -- model identity ------------------------------------------------------------------------------------------------
_CONFIG_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "max_position_embeddings")


def model_identity(model: torch.nn.Module) -> dict[str, Any]:
    """Name, architecture hash and a hash of a few weight tensors (first, middle, last parameter; their first 64K
    values rounded to bf16, so the dtype the model runs in does not change it — the dtype is checked apart)."""
    config = getattr(model.config, "text_config", model.config)
    arch = {k: getattr(config, k, None) for k in _CONFIG_KEYS}
    params = [p for _, p in model.named_parameters()]
    h = hashlib.sha256()
    for p in (params[0], params[len(params) // 2], params[-1]):
        sample = p.detach().reshape(-1)[:65536].float().to(torch.bfloat16).cpu()
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return {
        "name": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        "config_sha256": hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest(),
        "weights_sha256": h.hexdigest(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


# -- state trees <-> JSON + tensors ----------------------------------------------------------------------------------
def _encode(obj: Any, tensors: dict[str, torch.Tensor], names: dict[int, str]) -> Any:
    """A store's state (tensors, numbers, strings, dtypes, tuples, lists, dicts, QuantizedTensors) as JSON, its
    tensors moved into `tensors` by reference name."""
    from memfit.core.quant import QuantizedTensor

    if isinstance(obj, torch.Tensor):
        if id(obj) not in names:
            names[id(obj)] = f"t{len(tensors)}"
            tensors[names[id(obj)]] = obj
        return {"T": names[id(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(x, tensors, names) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, tensors, names) for x in obj]
    if isinstance(obj, dict):
        return {"dict": [[_encode(k, tensors, names), _encode(v, tensors, names)] for k, v in obj.items()]}
    if isinstance(obj, QuantizedTensor):
        return {"qt": {f.name: _encode(getattr(obj, f.name), tensors, names) for f in dataclasses.fields(obj)}}
    raise TypeError(f"cannot save a {type(obj).__name__} in a context file")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    from memfit.core.quant import QuantizedTensor

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_decode(x, tensors) for x in obj]
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ValueError("malformed state tree")
    (kind, body), = obj.items()
    if kind == "T":
        return tensors[body]
    if kind == "dtype":
        dtype = getattr(torch, str(body), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {body!r}")
        return dtype
    if kind == "tuple":
        return tuple(_decode(x, tensors) for x in body)
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
    if kind == "qt":
        return QuantizedTensor(**{k: _decode(v, tensors) for k, v in body.items()})
    raise ValueError(f"unknown state entry {kind!r}")


def _checksum(header: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(header.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{str(t.dtype)}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _method_components(policy: Any) -> list[Any]:
    return [policy.evictor, policy.quantizer] if hasattr(policy, "quantizer") else [policy]


def _method_state(policy: Any) -> list[dict[str, Any]]:
    """Per-sequence state a method keeps on itself (not its parameters), e.g. Keyformer's prompt end per layer."""
    out = []
    for m in _method_components(policy):
        params = {f.name for f in dataclasses.fields(m)}
        out.append({k: v for k, v in vars(m).items() if k not in params and k != "budget" and k.startswith("_")})
    return out


# -- the context -----------------------------------------------------------------------------------------------------
class CompressedContext:
    """A document's compressed KV cache, ready to answer questions (see module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, info: dict[str, Any], layers: list[dict[str, Any]],
                 method_state: list[dict[str, Any]]) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.info = info  # method, budget, params, allocation, chat, document ids, seen, budgets, identity...
        self._layers = layers  # each store's state_dict (references; never mutated)
        self._method_state = method_state

    # -- what it is ------------------------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return str(self.info["method"])

    @property
    def seen(self) -> int:
        """Logical length of the document (tokens a full cache would hold); the question's positions start here."""
        return int(self.info["seen"])

    @property
    def document_ids(self) -> list[int]:
        return list(self.info["document_ids"])

    def nbytes(self) -> int:
        """Bytes the context's stores hold (the same figure `cache().nbytes()` reports before any question)."""
        return self.cache().nbytes()

    def full_nbytes(self) -> int:
        return self.cache().full_nbytes()

    # -- use ---------------------------------------------------------------------------------------------------------
    def cache(self, batch: int = 1) -> Any:
        """A fresh MemfitCache holding the document (its tensors shared with this context, not copied), for `batch`
        questions; answering mutates only the returned cache."""
        from memfit.api import make_cache

        info = self.info
        cache = make_cache(self.model, info["method"], info["budget"], info["params"], allocation=info["allocation"],
                           rows=batch)
        core = cache.core
        if len(self._layers) != core.num_layers:
            raise ContextFileError(f"the context has {len(self._layers)} layers, the model {core.num_layers}")
        for layer, state in zip(core.layers, self._layers, strict=True):
            layer.load_state_dict(state)
        for m, state in zip(_method_components(core.method), self._method_state, strict=True):
            for k, v in state.items():
                setattr(m, k, _copy_containers(v))
        core.prompt_lens = torch.tensor(info["prompt_lens"], dtype=torch.long)
        core.keep_rows = None if info["keep_rows"] is None else torch.tensor(info["keep_rows"], dtype=torch.long)
        core.skipped_prompt_tokens = int(info["skipped_prompt_tokens"])
        core.prefill_done = True
        if batch != 1:
            if batch < 1:
                raise ConfigError("batch must be >= 1")
            device = next(self.model.parameters()).device
            core.select_batch(torch.zeros(batch, dtype=torch.long, device=device))
        return cache

    def encode_questions(self, questions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask of the questions as continuations of the document (the chat template's end of
        the user turn and the assistant header follow each question when the document was framed by it)."""
        from memfit.engine import _pad_id, pad_left

        if not questions or any(not q or not q.strip() for q in questions):
            raise ConfigError("the question is empty: give it with --prompt, --prompt-file or on stdin")
        suffix = _chat_parts(self.tokenizer)[1] if self.info["chat"] else ""
        rows = [self.tokenizer(f"\n\n{q.strip()}{suffix}", add_special_tokens=False)["input_ids"] for q in questions]
        return pad_left(rows, pad_id=_pad_id(self.tokenizer))

    # -- files -------------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the context as one safetensors file; returns the path."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        tree = _encode({"layers": self._layers, "method_state": self._method_state}, tensors, {})
        header = json.dumps({"info": self.info, "state": tree}, sort_keys=True)
        # contiguous CPU copies that own their memory (safetensors refuses tensors sharing storage)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        meta = {"format": FORMAT, "version": str(VERSION), "header": header, "checksum": _checksum(header, tensors)}
        out = Path(path)
        tmp = out.with_name(out.name + ".partial")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, out)
        except OSError as e:
            raise ConfigError(f"cannot write the context file {out}: {e.strerror or e}") from None
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: torch.nn.Module | tuple[torch.nn.Module, Any],
             tokenizer: Any = None) -> CompressedContext:
        """Read a context file for `model` (a module, or the (model, tokenizer) pair `load_model` returns).
        Raises ContextFileError (a ConfigError) for anything that is not a usable context for this model."""
        if isinstance(model, tuple):
            model, tokenizer = model
        info, tree, tensors = _read(Path(path))
        ident, mine = info["model"], model_identity(model)
        where = f"{path} was made with"
        if ident["config_sha256"] != mine["config_sha256"]:
            raise ContextFileError(f"{where} another model ({ident['name']}), not this one ({mine['name']}): "
                                   "compress the document again with this model, or load that model (--model)")
        if ident["weights_sha256"] != mine["weights_sha256"]:
            raise ContextFileError(f"{where} a model of the same shape but other weights ({ident['name']}): "
                                   "compress the document again with this model, or load that model (--model)")
        if ident["dtype"] != mine["dtype"]:
            raise ContextFileError(f"{where} the model in {ident['dtype']}, it now runs in {mine['dtype']}: "
                                   f"load it with --dtype {ident['dtype']}, or compress the document again")
        device = next(model.parameters()).device
        tensors = {k: v.to(device) for k, v in tensors.items()}
        try:
            state = _decode(tree, tensors)
            ctx = cls(model, tokenizer, info, state["layers"], state["method_state"])
            ctx.cache()  # every layer's state loads into this method's stores (or the file does not fit them)
        except ContextFileError:
            raise
        except ConfigError as e:  # e.g. a method or parameter this memfit does not have
            raise ContextFileError(f"{path}: its method {info.get('method')!r} cannot be rebuilt here ({e})") from None
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
            raise ContextFileError(f"{path} is damaged or does not fit method {info.get('method')!r} ({e}); "
                                   "compress the document again") from None
        return ctx


def _copy_containers(v: Any) -> Any:
    """Fresh dicts/lists (tensors shared): a method may update its per-sequence dicts in place."""
    if isinstance(v, dict):
        return {k: _copy_containers(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy_containers(x) for x in v]
    return v


def _read(path: Path) -> tuple[dict[str, Any], Any, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ContextFileError(f"no context file at {path}: make one with `memfit compress ... -o {path}`")
    what = f"{path} is not a memfit context file (make one with `memfit compress`)"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ContextFileError(what)
            try:
                version = int(meta.get("version", ""))
            except ValueError:
                raise ContextFileError(f"{path}: unreadable format version {meta.get('version')!r}") from None
            if version > VERSION:
                raise ContextFileError(f"{path} uses context format {version}, newer than this memfit reads "
                                       f"({VERSION}): upgrade memfit, or compress the document again")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except ContextFileError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        size = path.stat().st_size
        raise ContextFileError(f"{what}, or it is truncated or damaged ({size} bytes; {type(e).__name__}: {e})") \
            from None
    header = meta.get("header", "")
    if _checksum(header, tensors) != meta.get("checksum"):
        raise ContextFileError(f"{path} is damaged (its checksum does not match): compress the document again")
    try:
        body = json.loads(header)
        return body["info"], body["state"], tensors
    except (ValueError, KeyError) as e:
        raise ContextFileError(f"{path} is damaged ({e}): compress the document again") from None


def _chat_parts(tokenizer: Any) -> tuple[str, str]:
    """(text before, text after) a user message in the tokenizer's chat template, generation prompt included."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SPLIT}], add_generation_prompt=True,
                                         tokenize=False)
    if not isinstance(text, str) or text.count(_SPLIT) != 1:
        raise ConfigError("the tokenizer's chat template does not place the message verbatim: use chat=False "
                          "(--no-chat)")
    before, after = text.split(_SPLIT)
    return before, after


def encode_document(tokenizer: Any, document: str, chat: bool = True) -> list[int]:
    """The document's token ids as a context: after the chat template's opening of a user turn when `chat` (and the
    tokenizer has a template), so questions asked later close the turn (see `CompressedContext.encode_questions`)."""
    if not document or not document.strip():
        raise ConfigError("the document is empty: give text with --prompt, --prompt-file or on stdin")
    if chat and getattr(tokenizer, "chat_template", None):
        before, _ = _chat_parts(tokenizer)
        return list(tokenizer(before + document.strip(), add_special_tokens=False)["input_ids"])
    return list(tokenizer(document.strip(), add_special_tokens=True)["input_ids"])


def uses_chat(tokenizer: Any, chat: bool) -> bool:
    return bool(chat and getattr(tokenizer, "chat_template", None))


# -- compress ----------------------------------------------------------------------------------------------------
def compress(
    document: str,
    model: str | tuple[torch.nn.Module, Any] = "default",
    method: str = "full",
    budget: float | int | str | None = None,
    params: dict[str, Any] | None = None,
    allocation: str = "uniform",
    chat: bool = True,
    prefill_chunk: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    spans: bool | str | None = "auto",
) -> CompressedContext:
    """Prefill `document` with `method` at `budget` and return its compressed cache as a reusable context.
    `spans`: keep whole words/numbers when one of their tokens is kept (memfit.core.spans; auto = on for an eviction
    method with a budget, as `memfit run`)."""
    from memfit.models import load_model

    if isinstance(model, str):
        mdl, tok = load_model(model, device=device, dtype=dtype)
    else:
        mdl, tok = model
    ids = encode_document(tok, document, chat)
    return compress_ids(mdl, tok, ids, method, budget, params, allocation, uses_chat(tok, chat), prefill_chunk,
                        spans)


def compress_ids(
    mdl: torch.nn.Module,
    tok: Any,
    ids: Sequence[int],
    method: str = "full",
    budget: float | int | str | None = None,
    params: dict[str, Any] | None = None,
    allocation: str = "uniform",
    chat: bool = False,
    prefill_chunk: int | None = None,
    spans: bool | str | None = "auto",
) -> CompressedContext:
    """`compress` for token ids already encoded (`chat`: whether they open a chat-template user turn)."""
    from memfit.api import make_cache
    from memfit.core.spans import enable_spans, resolve_spans
    from memfit.engine import _sync, prefill

    ids = [int(i) for i in ids]
    if not ids:
        raise ConfigError("the document is empty")
    cache = make_cache(mdl, method, budget, params, allocation=allocation)
    bind = getattr(cache.method, "bind_tokenizer", None)
    if bind is not None and tok is not None:
        bind(tok)  # KVzip words its reconstruction prompt with the tokenizer
    # span ids come from the tokenizer's pieces: without a tokenizer (token ids only) there are none
    spans = resolve_spans(spans, method, budget) and tok is not None
    if spans:
        enable_spans(cache, tok)
    dev = next(mdl.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
    mask = torch.ones_like(input_ids)
    _sync(dev)
    t0 = time.perf_counter()
    prefill(mdl, input_ids, mask, cache, prefill_chunk)
    _sync(dev)
    seconds = time.perf_counter() - t0
    core = cache.core
    info = {
        "model": model_identity(mdl),
        "method": method,
        "budget": None if budget is None else budget if isinstance(budget, (int, float)) else str(budget),
        "budget_resolved": str(core.budget),
        "params": {k: v for k, v in (params or {}).items()},
        "allocation": allocation,
        "spans": bool(spans),
        "chat": bool(chat),
        "document_ids": ids,
        "seen": core.seen_tokens(),
        "prompt_lens": core.prompt_lens.tolist() if core.prompt_lens is not None else [len(ids)],
        "keep_rows": None if core.keep_rows is None else core.keep_rows.tolist(),
        "skipped_prompt_tokens": core.skipped_prompt_tokens,
        "compress_seconds": seconds,
        "kv_bytes_full": cache.full_nbytes(),
        "kv_bytes_held": cache.nbytes(),
        "memfit_version": _version(),
    }
    return CompressedContext(mdl, tok, info, [layer.state_dict() for layer in core.layers],
                             [{k: _copy_containers(v) for k, v in s.items()} for s in _method_state(core.method)])


def _version() -> str:
    import memfit

    return str(getattr(memfit, "__version__", "0"))
