"""The diagnostic scripts under scripts/: the numbers they report on small, hand-checked inputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(verdicts: dict[str, dict[str, bool]]) -> dict:
    """A results.json holding one prompt per category: verdicts[group][policy]."""
    rows = [
        {"group": g, "prompt": f"{g} prompt", "policy": p, "refused": v}
        for g, by_policy in verdicts.items()
        for p, v in by_policy.items()
    ]
    rows.append({"group": "a", "prompt": "a prompt", "policy": "a,b", "refused": True})  # order 2: ignored
    rows.append({"group": "neutral", "prompt": "hi", "policy": "a", "refused": True})  # not a category prompt
    return {"categories": ["a", "b", "c"], "responses": rows}


def test_refusal_agreement_counts_other_policies_per_prompt():
    agreement = _script("refusal_agreement").agreement
    a = agreement(
        _results(
            {
                "a": {"(empty)": False, "a": True, "b": False, "c": False},  # refused by 0 others
                "b": {"(empty)": True, "a": True, "b": True, "c": True},  # by both others
                "c": {"(empty)": False, "a": True, "b": False, "c": False},  # by 1, not by its own
            }
        )
    )
    assert a["prompts"] == 3 and a["observed"] == [1, 1, 1]
    assert a["other_rate"] == pytest.approx(3 / 6)
    assert a["own_refused"] == [1, 0, 1] and a["base_refused"] == [0, 0, 1]
    assert a["independent"] == pytest.approx([0.75, 1.5, 0.75])  # 3 × binomial(2, 0.5)


def test_refusal_agreement_names_a_missing_policy():
    agreement = _script("refusal_agreement").agreement
    partial = _results({"a": {"(empty)": False, "a": True, "b": False}, "b": {"(empty)": False}})
    with pytest.raises(ValueError, match="no verdict under c"):
        agreement(partial)
    with pytest.raises(ValueError, match="category prompts"):
        agreement({"categories": ["a", "b"], "responses": []})


def test_token_controls_keep_norms_or_remove_the_shared_direction(tiny_backbone, tiny_tokens):
    controls = _script("token_controls")
    unit = controls.shared_direction(tiny_tokens)
    assert float(unit.norm()) == pytest.approx(1.0)
    norms = {n: b.detach().norm(dim=-1).clone() for n, b in tiny_tokens.blocks.items()}
    embedding = tiny_backbone.model.get_input_embeddings().weight.detach().float()
    controls.randomise(tiny_tokens, embedding, seed=0)
    for name, block in tiny_tokens.blocks.items():
        assert torch.allclose(block.norm(dim=-1), norms[name], atol=1e-5)
    controls.remove_direction(tiny_tokens, unit)
    for block in tiny_tokens.blocks.values():
        assert torch.allclose(block @ unit, torch.zeros(block.shape[0]), atol=1e-5)
