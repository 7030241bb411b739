"""The step caches (prompt heads, base-model states): the values of a fresh pass, budgets, training."""

from __future__ import annotations

import pytest
import torch
from test_controlled import PROMPTS, perturb

from mosaic_safety.config import ConfigError, load_config
from mosaic_safety.controlled import ControlledModel
from mosaic_safety.policy import Policy
from mosaic_safety.training.base_states import BaseStates
from mosaic_safety.training.head_cache import HeadCache
from mosaic_safety.training.teacher import BaseResponseCache
from mosaic_safety.training.trainer import Trainer


def _logits(cm, heads, prompts, policies, targets):
    with torch.no_grad():
        logits, labels = cm.response_logits(prompts, policies, targets, heads)
    return logits[labels != -100]


@pytest.mark.parametrize("placement", ["user_end", "assistant"])
def test_cached_heads_give_the_values_of_a_fresh_prefill(tiny_backbone, tiny_tokens, minors, placement):
    """With ``assistant`` placement the empty-policy row has only its target after the head: its first
    logit comes from the head's stored last state."""
    tiny_tokens.placement = placement
    perturb(tiny_tokens, seed=3)
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    cache = HeadCache(cm, 2**30)
    # first call: every head computed (a repeated prompt once) and stored, unpadded
    first = ["hi", *PROMPTS, "hi"]
    cache.heads(first)
    assert len(cache) == 4 and cache.misses == 5 and cache.hits == 0
    # a later batch mixes cached prompts with a new one, in another order and with other padding
    prompts = [PROMPTS[2], "a new request, longer than any other one in this batch", "hi", PROMPTS[0]]
    policies = [
        minors.policy("alcohol"),
        minors.policy("sex,horror"),
        minors.policy("betting"),
        minors.policy(""),
    ]
    targets = [[5, 6, 2], [9, 2], [11, 12, 13, 2], [4]]
    heads = cache.heads(prompts)
    assert cache.hits == 3 and cache.misses == 6 and len(cache) == 5
    fresh = cm.prefill_heads(prompts)
    assert torch.equal(heads.lengths, fresh.lengths) and torch.equal(heads.mask, fresh.mask)
    # padded positions differ (zeros vs the pad token's keys) but are masked: the logits agree
    torch.testing.assert_close(
        _logits(cm, heads, prompts, policies, targets),
        _logits(cm, fresh, prompts, policies, targets),
        rtol=1e-5,
        atol=5e-5,
    )
    for (k, v), (fk, fv) in zip(heads.keys_values, fresh.keys_values):
        real = heads.mask.bool()
        torch.testing.assert_close(k.transpose(1, 2)[real], fk.transpose(1, 2)[real], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v.transpose(1, 2)[real], fv.transpose(1, 2)[real], rtol=1e-5, atol=1e-5)


def test_budget_bounds_the_cache_and_prompts_past_it_still_work(tiny_backbone, tiny_tokens, minors):
    tiny_tokens.placement = "user_end"
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    probe = HeadCache(cm, 2**30)
    probe.heads(PROMPTS[:1])
    one = probe.bytes
    cache = HeadCache(cm, one)  # room for exactly that prompt's head
    cache.heads(PROMPTS)
    assert cache.bytes <= one and len(cache) == 1
    again = cache.heads(PROMPTS)  # two recomputed, one from the cache
    fresh = cm.prefill_heads(PROMPTS)
    assert torch.equal(again.mask, fresh.mask)
    off = HeadCache(cm, 0)
    assert off.heads(PROMPTS) is not None and len(off) == 0
    with pytest.raises(ValueError, match=">= 0"):
        HeadCache(cm, -1)


def test_warming_fills_the_cache_up_to_its_budget(tiny_backbone, tiny_tokens):
    tiny_tokens.placement = "user_end"
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    prompts = [*PROMPTS, "hi", "a somewhat longer request about nothing in particular", "hi"]
    cache = HeadCache(cm, 2**30)
    seen = []
    assert cache.warm(prompts, batch_size=2, progress=seen.append) == 5 and len(cache) == 5
    assert sum(seen) == 5 and cache.warm(prompts) == 0  # nothing left to do
    cache.heads(prompts)
    assert cache.hits == len(prompts)  # training then finds every head
    one = HeadCache(cm, 2**30)
    one.warm(["hi"])
    small = HeadCache(cm, one.bytes)  # room for the shortest head only
    assert small.warm(prompts, batch_size=2) == 1 and len(small) == 1
    assert HeadCache(cm, 0).warm(prompts) == 0


def test_base_answers_over_kept_heads_are_the_plain_answers(tmp_path, tiny_backbone):
    cm = ControlledModel(tiny_backbone, placement="user_end")
    prompts = [*PROMPTS, "hi", "another request"]
    plain = BaseResponseCache(cm, tmp_path / "plain", max_new_tokens=6, batch_size=3)
    heads = HeadCache(cm, 2**30)
    heads.warm(prompts)
    over = BaseResponseCache(cm, tmp_path / "over", max_new_tokens=6, batch_size=3, heads=heads)
    assert plain.fill(prompts) == over.fill(prompts) == len(prompts)
    assert heads.hits >= len(prompts)  # generation took the kept heads
    assert [over.get(p) for p in prompts] == [plain.get(p) for p in prompts]
    assert len({tuple(plain.get(p)) for p in prompts}) > 1


def test_prefix_placement_has_no_heads(tiny_backbone, tiny_tokens):
    tiny_tokens.placement = "prefix"
    cache = HeadCache(ControlledModel(tiny_backbone, tiny_tokens), 2**30)
    assert cache.heads(PROMPTS) is None and len(cache) == 0


@pytest.mark.parametrize("shared", [True, False])
def test_base_states_give_the_base_models_logits(tiny_backbone, tiny_tokens, shared):
    tiny_tokens.placement = "user_end"
    perturb(tiny_tokens, seed=4)
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]]
    targets = [[5, 6, 7, 2], [9, 2], [5, 6, 7, 2], [11, 12, 13, 14, 15, 2]]  # rows 0 and 2 are one pair
    heads = cm.prefill_heads(prompts) if shared else None
    with torch.no_grad():
        ref, labels = cm.response_logits(prompts, [Policy(())] * 4, targets, heads)
    cache = BaseStates(cm, 2**30)
    valid = labels != -100
    for _ in range(2):  # computed, then read back
        got = cache.logits(prompts, targets, heads)
        assert got.shape == ref.shape
        torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=5e-5)
    assert len(cache) == 3 and cache.misses == 4 and cache.hits == 4
    other = cache.logits([PROMPTS[0]], [[5, 6, 2]])  # same prompt, another target: its own entry
    assert len(cache) == 4 and other.shape[1] == 3
    off = BaseStates(cm, 0)
    torch.testing.assert_close(off.logits(prompts, targets, heads)[valid], ref[valid], rtol=1e-5, atol=5e-5)
    assert len(off) == 0
    with pytest.raises(ValueError, match=">= 0"):
        BaseStates(cm, -1)


@pytest.mark.parametrize("placement", ["user_end", "assistant"])
def test_training_with_and_without_the_cache_agrees(tiny_backbone, tmp_path, placement):
    """Two epochs through the cache end where two epochs of fresh prefills end (float rounding)."""
    overrides = [
        "optim.epochs=2",
        f"tokens.placement={placement}",
        "tokens.deep=true",
        "optim.refusal_path_kl=1",
    ]
    runs = {}
    for mb in (64, 0):
        config = load_config("configs/tiny-test.yaml", [*overrides, f"optim.cache_mb={mb}"])
        trainer = Trainer(config, backbone=tiny_backbone)
        trainer.train(tmp_path / f"mb{mb}")
        runs[mb] = (trainer, {k: v.detach().clone() for k, v in trainer.tokens.named_tensors().items()})
    cached, fresh = runs[64][1], runs[0][1]
    assert runs[64][0].head_cache.hits > 0 and len(runs[0][0].head_cache) == 0
    assert runs[64][0].base_states.hits > 0 and len(runs[0][0].base_states) == 0
    assert cached.keys() == fresh.keys()
    for name in cached:
        torch.testing.assert_close(cached[name], fresh[name], rtol=1e-4, atol=1e-4)


def test_negative_budget_is_a_config_error():
    with pytest.raises(ConfigError, match="cache_mb"):
        load_config("configs/tiny-test.yaml", ["optim.cache_mb=-1"])


# --- mutation-testing round 2 (mut2): gap found in base_states.py -----------------------------


def test_base_states_budget_bounds_the_cache_and_pairs_past_it_still_work(tiny_backbone, tiny_tokens):
    """The base-state cache keeps no more than its byte budget (a large model on a small device
    must only lose the saving, never run out of memory); pairs past it are recomputed, alike."""
    tiny_tokens.placement = "user_end"
    cm = ControlledModel(tiny_backbone, tiny_tokens)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    targets = [[5, 6, 7, 2], [9, 2], [11, 12, 13, 2]]
    probe = BaseStates(cm, 2**30)
    probe.logits(prompts[:1], targets[:1])
    one = probe.bytes
    assert one > 0
    cache = BaseStates(cm, one)  # room for exactly the first pair
    first = cache.logits(prompts, targets)
    assert cache.bytes <= one and len(cache) == 1
    again = cache.logits(prompts, targets)  # one from the cache, two recomputed
    assert len(cache) == 1 and cache.hits == 1 and cache.misses == 5
    torch.testing.assert_close(again, first)
