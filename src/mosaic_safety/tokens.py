"""Control tokens: ``m`` learnable embedding vectors per category, and their artifact on disk.

The artifact is a directory with ``tokens.safetensors`` (one float32 tensor ``category.<name>`` of
shape ``(m, d)`` per category, plus ``deep.<name>`` of shape ``(layers, m, d)`` for deep tokens) and
``mosaic.json`` (format version, backbone identity, categories, placement, training provenance,
metrics). It is written atomically and validated on load: a different backbone, a wrong hidden
size, a non-finite value or a corrupt file is a clear error.
Only safetensors is ever read, so loading an untrusted artifact cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from . import __version__
from .policy import Category, CategoryRegistry, Policy

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.safetensors"
MANIFEST_FILE = "mosaic.json"
PLACEMENTS = ("prefix", "system", "user", "user_end", "assistant")
INITS = ("description", "text", "vocab")  # how fresh blocks start (``ControlTokens.initialise``)


class ArtifactError(ValueError):
    """An artifact that cannot be loaded, or does not fit the backbone it is loaded onto."""


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("cannot initialise control tokens from an empty text")
    return ids


def init_from_text(embedding: nn.Embedding, tokenizer: Any, text: str, m: int) -> torch.Tensor:
    """Initial vectors from a text: its token embeddings split into ``m`` chunks, each averaged.

    Averaging contiguous chunks keeps every vector inside the span of real token embeddings (so the
    frozen model sees in-distribution inputs at step 0) while using the whole description, not just
    its first ``m`` tokens.
    """
    ids = _text_ids(tokenizer, text)
    with torch.no_grad():
        vectors = embedding.weight[torch.tensor(ids, device=embedding.weight.device)].float().cpu()
    chunks = torch.tensor_split(vectors, min(m, len(ids)))
    rows = [c.mean(0) for c in chunks]
    while len(rows) < m:  # a text shorter than m tokens: repeat it
        rows.append(rows[len(rows) % len(chunks)])
    return torch.stack(rows)


def init_from_text_tokens(embedding: nn.Embedding, tokenizer: Any, text: str, m: int) -> torch.Tensor:
    """Initial vectors copied from the first ``m`` token rows of a text (PEFT's ``TEXT`` choice).

    Unlike :func:`init_from_text` nothing is averaged, so every vector has a real token's norm and
    meaning; a text shorter than ``m`` tokens is repeated.
    """
    ids = _text_ids(tokenizer, text)
    ids = (ids * (m // len(ids) + 1))[:m]
    with torch.no_grad():
        idx = torch.tensor(ids, device=embedding.weight.device)
        return embedding.weight[idx].float().cpu().clone()


def init_from_vocab(embedding: nn.Embedding, m: int, generator: torch.Generator) -> torch.Tensor:
    """Initial vectors copied from ``m`` random vocabulary rows (the PEFT ``RANDOM`` choice)."""
    idx = torch.randint(0, embedding.weight.shape[0], (m,), generator=generator)
    with torch.no_grad():
        return embedding.weight[idx.to(embedding.weight.device)].float().cpu().clone()


class ControlTokens(nn.Module):
    """Per-category control-token blocks and their composition into one prefix per policy.

    Deep tokens (``deep``, off by default) add, per category, one learned offset per control token
    and per decoder layer after the first: the token's hidden state entering layer ``l + 1`` gets
    ``deep[name][l]`` added. Input-level tokens can steer the frozen model only through what their
    embeddings cause in every layer; the offsets give each layer's attention its own handle, as
    P-tuning v2 does for small models where input-only prompt tuning lags behind fine-tuning.
    Offsets start at zero, so a deep set starts out identical to its input-level one.
    """

    def __init__(
        self,
        registry: CategoryRegistry,
        blocks: dict[str, torch.Tensor],
        placement: str = "prefix",
        deep: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
        unknown = [n for n in blocks if n not in registry]
        if unknown:
            raise ArtifactError(f"token blocks for categories not in the registry: {unknown}")
        self.registry = registry
        self.placement = placement
        # pairs, not a dict: ParameterDict sorts a plain dict's keys, and the order here is the
        # registry's, in which a policy composes its blocks
        self.blocks = nn.ParameterDict(
            [(n, nn.Parameter(blocks[n].float().clone())) for n in registry.names if n in blocks]
        )
        dims = {b.shape[1] for b in self.blocks.values()}
        if len(dims) > 1:
            raise ArtifactError(f"token blocks disagree on the hidden size: {sorted(dims)}")
        deep = deep or {}
        if deep and set(deep) != set(self.blocks):
            raise ArtifactError(
                f"deep offsets for {sorted(deep)} but token blocks for {sorted(self.blocks)}; "
                "a deep artifact needs both for every category"
            )
        for name, offsets in deep.items():
            block = self.blocks[name]
            if offsets.dim() != 3 or offsets.shape[1:] != block.shape:
                raise ArtifactError(
                    f"deep offsets of {name!r} have shape {tuple(offsets.shape)}, expected (layers, {block.shape[0]}, "
                    f"{block.shape[1]})"
                )
        if len({o.shape[0] for o in deep.values()}) > 1:
            raise ArtifactError("deep offsets disagree on the number of layers")
        self.deep = nn.ParameterDict(
            [(n, nn.Parameter(deep[n].float().clone())) for n in self.blocks if n in deep]
        )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def initialise(
        cls,
        registry: CategoryRegistry,
        embedding: nn.Embedding,
        tokenizer: Any,
        m: int,
        init: str = "description",
        placement: str = "prefix",
        seed: int = 0,
        categories: Iterable[str] | None = None,
        deep_layers: int = 0,
    ) -> ControlTokens:
        """Fresh blocks for ``categories`` (all by default); ``deep_layers`` > 0 adds zero offsets."""
        if not 1 <= m <= 64:
            raise ValueError(f"tokens per category must be between 1 and 64, got {m}")
        generator = torch.Generator().manual_seed(seed)
        blocks = {}
        for cat in registry:
            if categories is not None and cat.name not in set(categories):
                continue
            if init == "description":
                blocks[cat.name] = init_from_text(embedding, tokenizer, _init_text(cat), m)
            elif init == "text":
                blocks[cat.name] = init_from_text_tokens(embedding, tokenizer, _init_text(cat), m)
            elif init == "vocab":
                blocks[cat.name] = init_from_vocab(embedding, m, generator)
            else:
                raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
        if deep_layers < 0:
            raise ValueError(f"deep_layers must be 0 or more, got {deep_layers}")
        deep = {n: torch.zeros(deep_layers, *b.shape) for n, b in blocks.items()} if deep_layers else None
        return cls(registry, blocks, placement, deep)

    # -- properties ---------------------------------------------------------------------------
    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.blocks.keys())

    @property
    def hidden_size(self) -> int:
        return next(iter(self.blocks.values())).shape[1]

    def tokens_per_category(self) -> dict[str, int]:
        return {n: int(b.shape[0]) for n, b in self.blocks.items()}

    @property
    def deep_layers(self) -> int:
        """Decoder layers with learned offsets (0: input-level tokens only)."""
        return next(iter(self.deep.values())).shape[0] if len(self.deep) else 0

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.named_tensors().values())

    def named_tensors(self) -> dict[str, nn.Parameter]:
        """Every learned tensor under its artifact key (``category.<name>``, ``deep.<name>``)."""
        out = {f"category.{n}": b for n, b in self.blocks.items()}
        return out | {f"deep.{n}": o for n, o in self.deep.items()}

    def category_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of one category: its block and, for deep tokens, its offsets."""
        return [self.blocks[name]] + ([self.deep[name]] if name in self.deep else [])

    def compose(self, policy: Policy, credit: str | None = None) -> torch.Tensor:
        """The prefix for a policy: its categories' blocks in registry order, shape ``(sum m, d)``.

        With ``credit`` only that category's block keeps its gradient; the others enter as constants
        (``optim.positive_credit``).
        """
        missing = [c for c in policy if c not in self.blocks]
        if missing:
            raise ArtifactError(
                f"no control tokens for {', '.join(missing)}; this artifact has {', '.join(self.categories)}"
            )
        if not policy:
            return torch.zeros(0, self.hidden_size, device=self._device())
        return torch.cat([_credited(self.blocks[c], c, credit) for c in policy], dim=0)

    def compose_deep(self, policy: Policy, credit: str | None = None) -> torch.Tensor | None:
        """The per-layer offsets for a policy, ``(layers, sum m, d)`` in the order of :meth:`compose`."""
        if not self.deep or not policy:
            return None
        self.compose(policy)  # same error for a category without tokens
        return torch.cat([_credited(self.deep[c], c, credit) for c in policy], dim=1)

    def _device(self) -> torch.device:
        return next(iter(self.blocks.values())).device

    def freeze(self, names: Iterable[str]) -> None:
        for n in names:
            for p in self.category_parameters(n):
                p.requires_grad_(False)

    def add_categories(self, new: ControlTokens) -> None:
        """Add another set's blocks (incremental training); existing blocks are left untouched."""
        clash = set(new.categories) & set(self.categories)
        if clash:
            raise ArtifactError(f"categories already trained: {sorted(clash)}")
        if self.deep_layers != new.deep_layers:
            raise ArtifactError(
                f"cannot add categories with {new.deep_layers} deep layers to tokens with {self.deep_layers}"
            )
        merged = {n: b for n, b in self.blocks.items()} | {n: b for n, b in new.blocks.items()}
        self.blocks = nn.ParameterDict([(n, merged[n]) for n in self.registry.names if n in merged])
        if self.deep_layers:
            deep = {n: o for n, o in self.deep.items()} | {n: o for n, o in new.deep.items()}
            self.deep = nn.ParameterDict([(n, deep[n]) for n in self.blocks])

    # -- artifact -----------------------------------------------------------------------------
    def save(
        self, out_dir: str | Path, backbone: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> Path:
        """Write ``tokens.safetensors`` and ``mosaic.json`` into ``out_dir`` without ever leaving half a file."""
        out = Path(out_dir)
        manifest = {
            "format": "mosaic-control-tokens",
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "backbone": backbone,
            "placement": self.placement,
            "deep_layers": self.deep_layers,
            "composition_order": list(self.registry.names),
            "registry": {"name": self.registry.name, "description": self.registry.description},
            "categories": [
                {**self.registry[n].to_dict(), "m": int(b.shape[0])} for n, b in self.blocks.items()
            ],
        } | (extra or {})
        tensors = {k: t.detach().float().cpu().contiguous() for k, t in self.named_tensors().items()}
        for key, t in tensors.items():  # ``load`` refuses them: never write an artifact that cannot be read
            if not torch.isfinite(t).all():
                raise ArtifactError(
                    f"{out}: {key} contains NaN or infinite values, not saved (training diverged: lower "
                    "optim.lr or the loss weights)"
                )
        # The artifact directory may also hold logs and checkpoints, so replace only our two files:
        # write both under temporary names, then rename (atomic per file on POSIX).
        out.mkdir(parents=True, exist_ok=True)
        tmp_tokens = out / f".{TOKENS_FILE}.{os.getpid()}.tmp"
        tmp_manifest = out / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
        try:
            data = safetensors_bytes(tensors, {"format_version": str(FORMAT_VERSION)})
            tmp_tokens.write_bytes(data)
            manifest["tokens_sha256"] = hashlib.sha256(data).hexdigest()  # checked on load (read_hashed)
            tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp_tokens, out / TOKENS_FILE)
            os.replace(tmp_manifest, out / MANIFEST_FILE)
        finally:
            tmp_tokens.unlink(missing_ok=True)
            tmp_manifest.unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, artifact_dir: str | Path, backbone: dict[str, Any] | Any = None) -> ControlTokens:
        """Load and validate an artifact; with ``backbone`` (``Backbone.describe()``, or the
        ``Backbone`` itself), check it fits."""
        if hasattr(backbone, "describe"):  # the Backbone was passed: "not subscriptable" said nothing
            backbone = backbone.describe()
        manifest = read_manifest(artifact_dir)
        path = Path(artifact_dir) / TOKENS_FILE
        data = read_hashed(path, manifest.get("tokens_sha256"))  # absent in artifacts from before it
        try:
            tensors = load_safetensors(data)
        except (SafetensorError, ValueError) as exc:
            raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from exc
        # composed in the order the tokens were trained in (the trainer's registry order), which
        # artifacts written before it was kept in the category list store only here
        order = manifest.get("composition_order") or [c["name"] for c in manifest["categories"]]
        categories = sorted(manifest["categories"], key=lambda c: order.index(c["name"]))
        registry = CategoryRegistry.from_dict(
            {
                **manifest["registry"],
                "categories": [
                    {k: c[k] for k in ("name", "display", "description", "refusal", "out_of_scope") if k in c}
                    for c in categories
                ],
            },
            source=str(Path(artifact_dir) / MANIFEST_FILE),
        )
        expected_d = manifest["backbone"].get("hidden_size")
        layers = manifest.get("deep_layers", 0)
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
            raise ArtifactError(f"{path}: deep_layers must be a non-negative integer, got {layers!r}")
        blocks, deep = {}, {}
        for cat in manifest["categories"]:
            name, m = cat["name"], cat["m"]
            blocks[name] = _checked_tensor(tensors, f"category.{name}", (m, expected_d), path)
            if layers:
                deep[name] = _checked_tensor(tensors, f"deep.{name}", (layers, m, expected_d), path)
        extra = (
            set(tensors)
            - {f"category.{c['name']}" for c in manifest["categories"]}
            - {f"deep.{n}" for n in deep}
        )
        if extra:
            raise ArtifactError(f"{path}: unexpected tensors {sorted(extra)}")
        if backbone is not None:
            check_backbone(manifest, backbone, artifact_dir)
        return cls(registry, blocks, manifest["placement"], deep or None)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, to be written like any other file: ``save_file`` creates it
    readable by its owner only, which breaks serving an artifact as another user."""
    return save_safetensors(tensors, metadata)


def read_hashed(path: Path, expected: str | None) -> bytes:
    """The bytes of an artifact's tensor file, checked against the hash its manifest recorded.

    Each of an artifact's two files is renamed into place atomically, the pair is not: the hash ties
    the manifest to its tensors, so a save killed between the renames reads as a mismatch, not as a
    valid artifact. ``expected`` is ``None`` for artifacts written before the hash was recorded.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from exc
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ArtifactError(
            f"{path} is not the file {MANIFEST_FILE} was written with (its hash differs): the "
            "artifact was changed by hand, or a save was interrupted between its two files"
        )
    return data


def _credited(tensor: torch.Tensor, category: str, credit: str | None) -> torch.Tensor:
    """``tensor`` itself if ``category`` gets the credit (or no category is singled out), else a constant."""
    return tensor if credit is None or category == credit else tensor.detach()


def _checked_tensor(
    tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], path: Path
) -> torch.Tensor:
    """One tensor of an artifact, present, float32, of the expected shape and finite."""
    if key not in tensors:
        raise ArtifactError(f"{path}: tensor {key!r} is missing")
    t = tensors[key]
    if t.dtype != torch.float32 or tuple(t.shape) != shape:
        expected = ", ".join(map(str, shape))
        raise ArtifactError(
            f"{path}: {key} has shape {tuple(t.shape)} {t.dtype}, expected ({expected}) float32"
        )
    if not torch.isfinite(t).all():
        raise ArtifactError(f"{path}: {key} contains NaN or infinite values")
    return t


def _init_text(cat: Category) -> str:
    return f"{cat.display}: {cat.description}"


def load_manifest_json(artifact_dir: str | Path) -> tuple[Any, Path]:
    """The parsed ``mosaic.json`` of an artifact directory (any JSON value) and its path.

    Shared by control-token and method artifacts (``methods/artifact.py``), so a missing
    directory, a missing manifest or broken JSON reads the same whichever kind was expected.
    """
    root = Path(artifact_dir)
    if root.is_file():
        raise ArtifactError(f"{root} is a file; give the artifact's directory ({root.parent})")
    if not root.is_dir():
        raise ArtifactError(f"{root}: artifact directory not found")
    path = root / MANIFEST_FILE
    if not path.exists():
        from .training.run_dir import set_aside_note  # it imports this module

        raise ArtifactError(f"{root}: not a mosaic artifact (no {MANIFEST_FILE}){set_aside_note(root)}")
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupt manifest ({exc})") from exc


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``mosaic.json`` (structure and format version)."""
    manifest, path = load_manifest_json(artifact_dir)
    if isinstance(manifest, dict) and manifest.get("format") == "mosaic-method":
        method = manifest.get("method")
        # DSA steers hidden states by a classifier and has no prompt rewrite the server could apply
        where = "evaluate it with `mosaic eval --artifact`" + (
            "" if method == "dsa" else ", serve it with `mosaic serve`"
        )
        raise ArtifactError(f"{path.parent}: a {method!r} artifact, not control tokens; {where}")
    if not isinstance(manifest, dict) or manifest.get("format") != "mosaic-control-tokens":
        raise ArtifactError(f"{path}: not a mosaic control-token manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # True and 1.0 equal 1 in Python
        raise ArtifactError(
            f"{path}: format version {version!r} is not supported by this library (expects {FORMAT_VERSION})"
        )
    for key in ("backbone", "categories", "placement", "registry"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest lacks {key!r}")
    if manifest["placement"] not in PLACEMENTS:
        raise ArtifactError(f"{path}: unknown placement {manifest['placement']!r}")
    _check_manifest_types(manifest, path)
    return manifest


def check_backbone_field(manifest: dict[str, Any], path: Path) -> None:
    """The manifest's model identity, as ``check_backbone`` reads it (every artifact kind has one)."""
    backbone = manifest.get("backbone")
    if (
        not isinstance(backbone, dict)
        or not isinstance(backbone.get("fingerprint"), str)
        or not isinstance(backbone.get("name"), str)
    ):
        raise ArtifactError(f"{path}: 'backbone' must be a mapping with the model's 'name' and 'fingerprint'")


def _check_manifest_types(manifest: dict[str, Any], path: Path) -> None:
    """The fields every reader indexes, of the types it indexes them as: a hand-edited or damaged
    manifest is an ``ArtifactError`` naming the field, not a ``KeyError`` deep in a loader."""
    backbone, registry, categories = manifest["backbone"], manifest["registry"], manifest["categories"]
    check_backbone_field(manifest, path)
    hidden = backbone.get("hidden_size")
    if type(hidden) is not int or hidden < 1:
        raise ArtifactError(f"{path}: backbone 'hidden_size' must be a positive integer, got {hidden!r}")
    if not isinstance(registry, dict) or not isinstance(registry.get("name"), str):
        raise ArtifactError(f"{path}: 'registry' must be a mapping with a 'name'")
    if not isinstance(categories, list) or not categories:
        raise ArtifactError(f"{path}: 'categories' must be a non-empty list")
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not isinstance(cat.get("name"), str):
            raise ArtifactError(f"{path}: categories[{i}] must be a mapping with a 'name'")
        for text in ("display", "refusal"):
            if not isinstance(cat.get(text), str):
                raise ArtifactError(f"{path}: category {cat['name']!r} needs {text!r}, a text")
        if type(cat.get("m")) is not int or cat["m"] < 1:
            raise ArtifactError(
                f"{path}: category {cat['name']!r} needs 'm', a positive integer, got {cat.get('m')!r}"
            )
    order = manifest.get("composition_order")
    names = [c["name"] for c in categories]
    if order is not None and (
        not isinstance(order, list)
        or not all(isinstance(n, str) for n in order)
        or not set(names) <= set(order)
        or len(set(order)) != len(order)
    ):
        raise ArtifactError(f"{path}: 'composition_order' must list every category once, got {order!r}")
    for section in ("training", "metrics"):
        if section in manifest and not isinstance(manifest[section], dict):
            raise ArtifactError(f"{path}: {section!r} must be a mapping")


def check_backbone(
    manifest: dict[str, Any], backbone: dict[str, Any], where: str | Path = "artifact"
) -> None:
    """Fail loudly when an artifact was trained on a different model."""
    trained = manifest["backbone"]
    if trained.get("hidden_size") != backbone["hidden_size"]:
        raise ArtifactError(
            f"{where}: trained for hidden size {trained.get('hidden_size')} ({trained.get('name')}), "
            f"but the model {backbone['name']} has hidden size {backbone['hidden_size']}"
        )
    if trained.get("fingerprint") != backbone["fingerprint"]:
        raise ArtifactError(
            f"{where}: trained on backbone {trained.get('name')} (fingerprint {trained.get('fingerprint')}), "
            f"but the loaded model {backbone['name']} has fingerprint {backbone['fingerprint']}; "
            "control tokens only work on the exact model they were trained on"
        )
