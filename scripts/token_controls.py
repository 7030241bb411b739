"""Control artifacts that ask what in a trained token block carries its refusals.

From a trained MOSAIC artifact this writes two artifacts beside each other, to be evaluated with
`mosaic eval` exactly like the original:

- ``random``: every vector replaced by a random vocabulary row rescaled to the trained vector's
  norm. Same norms, no learned direction: does mere magnitude perturb SmolLM2 into refusing?
- ``nocommon``: the trained vectors with one direction projected out: the mean of the categories'
  block means, the component every category shares. Does the shared part or the per-category
  part carry the refusals?

It also prints each block's mean-vector cosine to the others (``block_overlap`` in training).

    python scripts/token_controls.py runs/smollm2-minors --out runs
    mosaic eval --artifact runs/smollm2-minors-nocommon --out runs/eval/nocommon --limit 20 --max-order 1 --fast
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from mosaic_safety import ControlTokens, load_backbone
from mosaic_safety.tokens import read_manifest
from mosaic_safety.training.losses import block_overlap


def shared_direction(tokens: ControlTokens) -> torch.Tensor:
    """Unit vector along the mean of the categories' block means."""
    common = torch.stack([b.detach().mean(0) for b in tokens.blocks.values()]).mean(0)
    return common / common.norm()


@torch.no_grad()
def randomise(tokens: ControlTokens, embedding: torch.Tensor, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for block in tokens.blocks.values():
        rows = embedding[torch.randint(0, embedding.shape[0], (block.shape[0],), generator=gen)]
        block.copy_(F.normalize(rows, dim=-1) * block.norm(dim=-1, keepdim=True))


@torch.no_grad()
def remove_direction(tokens: ControlTokens, unit: torch.Tensor) -> None:
    for block in tokens.blocks.values():
        block.sub_((block @ unit)[:, None] * unit[None, :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for <name>-random and <name>-nocommon"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    manifest = read_manifest(args.artifact)
    backbone = load_backbone(manifest["backbone"]["name"])
    embedding = backbone.model.get_input_embeddings().weight.detach().float()

    tokens = ControlTokens.load(args.artifact, backbone.describe())
    if tokens.deep_layers:
        parser.error(f"{args.artifact} has deep offsets; these controls only change input-level vectors")
    means = F.normalize(torch.stack([b.detach().mean(0) for b in tokens.blocks.values()]), dim=-1)
    print("block-mean cosines:")
    for name, row in zip(tokens.categories, (means @ means.T).tolist(), strict=True):
        print(f"  {name:>12s} " + " ".join(f"{v:5.2f}" for v in row))
    print(f"block_overlap {float(block_overlap([b.detach() for b in tokens.blocks.values()])):.3f}")
    unit = shared_direction(tokens)

    for suffix, change in (
        ("random", lambda t: randomise(t, embedding, args.seed)),
        ("nocommon", lambda t: remove_direction(t, unit)),
    ):
        control = ControlTokens.load(args.artifact, backbone.describe())
        change(control)
        target = args.out / f"{args.artifact.name}-{suffix}"
        control.save(target, backbone.describe(), {"control": suffix, "source": str(args.artifact)})
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
