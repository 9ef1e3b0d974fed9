"""Random-weight models from a config (`--load-format dummy`, the convention vLLM uses).

Speed and memory do not depend on weight values, so anyone can reproduce a GPU figure for a real architecture
without downloading its weights: `memfit run --device cuda --model llama-3.1-8b --load-format dummy --context 32768`.

A dummy spec is a built-in config name (`llama-3.1-8b`, `qwen2.5-7b`, `gemma-3-1b`, `smollm2-135m`), a local
`config.json`, or a folder holding one. Weights are initialised directly on the target device (an 8B model in bf16
takes ~2 s on a GPU; initialising on the CPU and copying would take minutes). The text such a model writes is noise;
its tokenizer is a byte-level stand-in whose only job is to give `--prompt` text some token ids.

Under tensor parallelism (`--tp N`) each rank loads its shard through transformers' own plan, which reads a
checkpoint: `dummy_checkpoint` writes those same random weights once into the cache folder (safetensors shards
plus config.json, keyed by the config and dtype) and the ranks load it like any model folder. It is written one
tensor at a time (the model is built on the meta device and each weight drawn, copied to the RAM and dropped), so
neither the device nor the RAM ever holds the whole model: the device holds one tensor, the RAM one shard (<= 2 GB,
or a single larger tensor such as a 70B model's 2.1 GB embedding) and, briefly, a one-layer CPU copy of the model
that gives the norms' and biases' initial values. The disk takes the whole model (8B in bf16: 16 GB; 70B: 141 GB).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from memfit.errors import ConfigError
from memfit.paths import cache_dir

# Architecture fields only (from each model's published config.json); vocabularies are real sizes so the embedding
# and LM-head bytes are right.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "llama-3.1-70b": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "gemma-3-1b": {
        "model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
        "max_position_embeddings": 32768, "sliding_window": 512, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256, "bos_token_id": 2, "eos_token_id": 1,
    },
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    },
}


def dummy_config(spec: str) -> Any:
    """A transformers config for a built-in name, a config.json path, or a folder holding config.json."""
    from transformers import AutoConfig

    name = spec.strip().lower()
    if name in BUILTIN_CONFIGS:
        fields = dict(BUILTIN_CONFIGS[name])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            fields = json.loads(path.read_text())
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{spec!r} is not a usable config.json for --load-format dummy ({e})") from None
    known = ", ".join(sorted(BUILTIN_CONFIGS))
    raise ConfigError(f"unknown config {spec!r} for --load-format dummy: use one of {known}, "
                      "or a path to a config.json (or a folder holding one)")


class ByteTokenizer:
    """The tokenizer of a dummy model: UTF-8 bytes shifted past the special ids (enough to turn text into ids)."""

    chat_template = None
    padding_side = "left"

    def __init__(self, vocab_size: int, bos: int | None, eos: int | None) -> None:
        self.vocab_size = vocab_size
        self.bos_token_id = bos
        self.eos_token_id = eos
        self.pad_token_id = eos if eos is not None else 0
        self.offset = 3

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        ids = [self.offset + b for b in text.encode("utf-8")]
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in (self.bos_token_id, self.eos_token_id) if i is not None]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """One character per byte id (what span ids read: spaces start words, digits join digit runs); ids outside
        the byte range (specials, the rest of a large vocabulary) read as an empty piece."""
        return [chr(i - self.offset) if self.offset <= i < self.offset + 256 else "" for i in ids]

    def decode(self, ids: Any, skip_special_tokens: bool = True, **_: Any) -> str:
        raw = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return raw.decode("utf-8", errors="replace")


def load_dummy(spec: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, ByteTokenizer]:
    """(model with random weights on `device`, a byte tokenizer) for a dummy spec."""
    config = dummy_config(spec)
    model = random_model(config, dtype, device)
    model.config._name_or_path = spec
    return model, byte_tokenizer(config)


def random_model(config: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """The causal LM of a transformers `config` with random weights drawn on `device` (eval mode, SDPA attention):
    every >= 2-D weight from N(0, 0.02) with one generator seeded 0, in parameter order; norms and biases keep their
    initial values. (`dummy_checkpoint` writes exactly these values, tensor by tensor.)"""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # small random weights keep activations finite in bf16 (the init above may be skipped)
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def byte_tokenizer(config: Any) -> ByteTokenizer:
    """The byte tokenizer of a dummy model with this config (its vocabulary size and special ids)."""
    text = getattr(config, "text_config", config)
    eos = getattr(text, "eos_token_id", None)
    return ByteTokenizer(int(text.vocab_size), getattr(text, "bos_token_id", None),
                         eos[0] if isinstance(eos, list) else eos)


def _config_key(spec: str, dtype: torch.dtype) -> str:
    """A folder name for a dummy spec's checkpoint: the built-in name (or config file name) and a hash of the
    config's fields and dtype, so an edited config.json never reuses stale weights."""
    config = dummy_config(spec)
    fields = json.dumps(config.to_dict(), sort_keys=True, default=str)
    digest = hashlib.sha256(f"{fields}|{dtype}".encode()).hexdigest()[:12]
    stem = spec.strip().lower() if spec.strip().lower() in BUILTIN_CONFIGS else Path(spec).expanduser().stem
    return f"{stem}-{str(dtype).removeprefix('torch.')}-{digest}"


# The largest safetensors shard the checkpoint writer makes (transformers' "2GB", in bytes); a tensor larger than
# this gets a shard of its own.
SHARD_BYTES = 2 * 10**9


def dummy_checkpoint(spec: str, dtype: torch.dtype, device: torch.device, *, progress: bool = False,
                     shard_bytes: int | None = None) -> Path:
    """The folder of `spec`'s random-weight checkpoint in the cache (written on first use, through `device`).

    The weights are exactly `load_dummy(spec, dtype, device)`'s, drawn one tensor at a time (see `_write_weights`),
    so neither `device` nor the RAM ever holds the whole model. The write goes to a temporary folder renamed at the
    end, so an interrupted write never leaves a folder that looks complete. `shard_bytes`: the largest shard
    (default `SHARD_BYTES`)."""
    folder = cache_dir() / "dummy" / _config_key(spec, dtype)
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    if progress:
        print(f"memfit: writing random weights for {spec!r} to {folder} (once; tensor-parallel ranks load them)",
              file=sys.stderr, flush=True)
    try:
        tmp.mkdir(exist_ok=True)
        _write_weights(spec, dtype, device, tmp, SHARD_BYTES if shard_bytes is None else shard_bytes)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: its folder holds the same weights
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


_LAYER_INDEX = re.compile(r"\.layers\.\d+\.")


def _write_weights(spec: str, dtype: torch.dtype, device: torch.device, out: Path, shard_bytes: int) -> None:
    """Write `load_dummy(spec, dtype, device)`'s parameters into `out` as transformers' sharded safetensors layout.

    The model is built on the meta device (shapes and names only, no memory). Its parameters are walked in
    `named_parameters()` order, the order `load_dummy` draws them in (tied duplicates such as a tied LM head are
    skipped there too; `from_pretrained` ties them again). Each >= 2-D weight is drawn on `device` from one generator
    seeded 0, exactly as `load_dummy` does, so every value is bit-identical; then it is copied into the current
    shard in the RAM and the device copy dropped. 1-D parameters (norm weights, biases) are not random: they take
    `from_config`'s initial values, read from a one-layer copy of the model built on the CPU (see
    `_small_reference`)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = dummy_config(spec)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = list(model.named_parameters())
    if any(p.dim() == 0 for _, p in params):
        raise ConfigError(f"{spec!r}: a scalar parameter; the dummy checkpoint writer handles only tensors of "
                          "one or more dimensions (use a llama-, qwen2- or gemma3-style config)")
    reference = _small_reference(config, dtype, params)

    # Plan the shards first (sizes are known from the shapes), so the files get their final names as they are
    # written: a new shard starts when the next tensor would push a non-empty one past `shard_bytes`.
    plan: list[list[str]] = [[]]
    size = 0
    sizes = {name: p.numel() * p.element_size() for name, p in params}
    for name, _ in params:
        if plan[-1] and size + sizes[name] > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += sizes[name]
    files = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])

    gen = torch.Generator(device=device).manual_seed(0)
    shapes = dict(params)
    with torch.no_grad():
        for names, file in zip(plan, files, strict=True):
            shard: dict[str, torch.Tensor] = {}
            for name in names:
                shape = shapes[name].shape
                if len(shape) >= 2:
                    drawn = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen)
                    shard[name] = drawn.to("cpu").contiguous()
                    del drawn
                else:
                    shard[name] = reference[name]
            save_file(shard, str(out / file), metadata={"format": "pt"})
            del shard
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: file for names, file in zip(plan, files, strict=True) for name in names}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # What save_pretrained would write beside the weights: the config (naming the class and dtype, which
    # from_pretrained reads) and the generation defaults.
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _small_reference(config: Any, dtype: torch.dtype, params: list[tuple[str, torch.nn.Parameter]]
                     ) -> dict[str, torch.Tensor]:
    """The 1-D parameters of `from_config(config)`, by full name, read from a cheap copy built on the CPU.

    Their initial values repeat per layer (ones or zeros for norms, zeros for biases), so a copy with one hidden
    layer gives them all: `layers.<i>.` names read `layers.0.`'s tensor. The copy's vocabulary is shrunk too (the
    embedding and LM head are the bulk of its bytes), unless a 1-D parameter spans the vocabulary (an LM-head
    bias). Composite configs (a `text_config` inside) are built whole."""
    from transformers import AutoModelForCausalLM

    wanted = {name: p.shape for name, p in params if p.dim() == 1}
    if not wanted:
        return {}
    small = copy.deepcopy(config)
    if not hasattr(config, "text_config") and isinstance(getattr(config, "num_hidden_layers", None), int):
        small.num_hidden_layers = 1
        if isinstance(getattr(small, "layer_types", None), list):
            small.layer_types = small.layer_types[:1]
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and not any(vocab in shape for shape in wanted.values()):
            pad = getattr(config, "pad_token_id", None)  # the embedding's padding row must exist
            small.vocab_size = min(vocab, pad + 1 if isinstance(pad, int) else 1)
    with torch.device("cpu"):
        built = AutoModelForCausalLM.from_config(small, dtype=dtype)
    have = {name: p.detach() for name, p in built.named_parameters() if p.dim() == 1}
    out: dict[str, torch.Tensor] = {}
    for name, shape in wanted.items():
        src = name if name in have else _LAYER_INDEX.sub(".layers.0.", name)
        if src not in have or have[src].shape != shape:
            raise ConfigError(f"cannot tell the initial value of {name!r} for the dummy checkpoint (the one-layer "
                              "copy of this config lacks it): use a llama-, qwen2- or gemma3-style config")
        out[name] = have[src].clone().contiguous()
    return out
