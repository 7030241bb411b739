"""Hard negatives: inactive-category negatives steered by the tokens' measured over-refusal."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from mosaic_safety.config import ConfigError, load_config
from mosaic_safety.policy import Policy
from mosaic_safety.tokens import ArtifactError
from mosaic_safety.training.hard_negatives import confusion_from_rates
from mosaic_safety.training.sampler import OrderSampler

CATS = ["a", "b", "c", "d", "e"]


def make_sampler(**kw):
    prompts = {c: [f"{c} prompt {i}" for i in range(30)] for c in CATS}
    neutral = [f"neutral {i}" for i in range(30)]
    return OrderSampler(CATS, prompts, neutral, [], max_order=2, per_subset=40, inactive_share=1.0, **kw)


def inactive_counts(items, policy):
    return Counter(i.category for i in items if not i.positive and i.policy == Policy(tuple(policy)))


def test_weights_mix_uniform_and_the_policys_worst_confusion():
    s = make_sampler(hard_negatives=0.5)
    confusion = {"a": {"b": 0.6, "c": 0.2}, "b": {"c": 0.4}}
    weights = s.inactive_weights(("a",), ["b", "c", "d", "e"], confusion)
    assert weights == pytest.approx([0.125 + 0.5 * 0.75, 0.125 + 0.5 * 0.25, 0.125, 0.125])
    # under {a, b} a category's pull is the larger of the two blocks' rates: c gets b's 0.4
    assert s.inactive_weights(("a", "b"), ["c", "d", "e"], confusion) == pytest.approx(
        [1 / 6 + 0.5, 1 / 6, 1 / 6]
    )
    assert s.inactive_weights(("d",), ["a", "b"], confusion) is None  # nothing confused: uniform
    assert make_sampler().inactive_weights(("a",), ["b"], confusion) is None  # off


def test_confusion_steers_the_inactive_negatives():
    steered = make_sampler(hard_negatives=1.0).epoch_items(0, {"a": {"b": 0.5}})
    assert set(inactive_counts(steered, ["a"])) == {"b"}  # h = 1: all towards the one confused category
    assert len(set(inactive_counts(steered, ["c"]))) == 4  # other policies stay uniform
    half = inactive_counts(make_sampler(hard_negatives=0.5).epoch_items(0, {"a": {"b": 0.5}}), ["a"])
    assert half["b"] > 2 * max(half["c"], half["d"], half["e"])  # expected 62.5% against 12.5% each


def test_without_a_measure_the_draw_is_the_papers_bitwise():
    plain = make_sampler().epoch_items(3)
    assert make_sampler(hard_negatives=0.5).epoch_items(3) == plain  # first epoch: nothing measured yet
    assert make_sampler(hard_negatives=0.5).epoch_items(3, {"a": {"b": 0.0}}) == plain
    assert make_sampler().epoch_items(3, {"a": {"b": 0.9}}) == plain  # option off: a measure is ignored


def test_base_answers_cover_every_prompt_the_steered_draw_can_reach():
    s = make_sampler(hard_negatives=0.5)
    every = {p for c in CATS for p in s.prompts[c]} | set(s.neutral)
    assert set(s.drawn_negatives(range(2))) == every  # the base answers generated before training
    assert set(s.drawn_prompts(range(2))) == every


def test_confusion_leaves_out_a_policys_own_category():
    rates = {"a": {"a": 0.9, "b": 0.3, "neutral": 0.1}}
    assert confusion_from_rates(rates) == {"a": {"b": 0.3, "neutral": 0.1}}


def tiny_config(tmp_path, *overrides):
    return load_config("configs/tiny-test.yaml", [f"output={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.hard_negatives=1.5", r"sampling.hard_negatives must be in \[0, 1\]"),
        ("sampling.hard_negatives=-0.1", r"sampling.hard_negatives must be in \[0, 1\]"),
        ("sampling.hard_negatives=0.5 method=lora_sft", "method 'lora_sft' has no control tokens"),
        (
            "sampling.hard_negatives=0.5 sampling.inactive_share=0",
            "with sampling.inactive_share=0 there are none",
        ),
        ("sampling.hard_negatives=0.5 sampling.hard_negatives_per_group=0", "must be at least 1"),
    ],
)
def test_hard_negative_settings_are_checked(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *override.split())


def probe_what_the_model_opens_with(trainer):
    """Point the probe at each policy's most common greedy first token on the tiny random model.

    The trained refusal is never said by a random model, so every rate would be 0 and nothing would
    be steered; this makes the measure non-trivial while the trainer's own code does the rest.
    """
    probe = trainer.confusion_probe
    prompts = [p for rows in probe.groups.values() for p in rows]
    for c in probe.policies:
        first = trainer.model.generate_ids(prompts, [Policy((c,))] * len(prompts), max_new_tokens=1)
        probe.prefixes[c] = [Counter(row[0] for row in first).most_common(1)[0][0]]


def steered_trainer(tmp_path, tiny_backbone, *overrides, events=None):
    from mosaic_safety.training.trainer import Trainer

    cfg = tiny_config(tmp_path, "sampling.hard_negatives=1", "sampling.inactive_share=1", *overrides)
    reporter = (lambda kind, data: events.append((kind, data))) if events is not None else None
    trainer = Trainer(cfg, backbone=tiny_backbone, reporter=reporter)
    probe_what_the_model_opens_with(trainer)
    return trainer


def test_each_epoch_draws_by_the_confusion_measured_after_the_last(tmp_path, tiny_backbone):
    from mosaic_safety.controlled import ControlledModel
    from mosaic_safety.tokens import ControlTokens

    events = []
    trainer = steered_trainer(tmp_path, tiny_backbone, "optim.epochs=2", events=events)
    drawn = []
    real_batches = trainer.sampler.epoch_batches
    trainer.sampler.epoch_batches = lambda e, b, conf=None: drawn.append(conf) or real_batches(e, b, conf)
    trainer.train(tmp_path / "run")
    run = tmp_path / "run"
    logged = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    measured = {r["epoch"]: r["confusion"] for r in logged if "confusion" in r}
    assert set(measured) == {1, 2}
    assert drawn == [None, measured[1]]  # epoch 1 uniform, epoch 2 by what epoch 1 left
    assert [d["confusion"] for k, d in events if k == "confusion"] == [measured[1], measured[2]]
    ckpt = run / "checkpoints" / "epoch-1"
    assert json.loads((ckpt / "mosaic.json").read_text())["metrics"]["confusion"]["off_target"] == measured[1]
    again = ControlledModel(tiny_backbone, ControlTokens.load(ckpt, tiny_backbone.describe()))
    assert confusion_from_rates(trainer.confusion_probe.rates(again)) == measured[1]
    assert any(r > 0 for row in measured[1].values() for r in row.values())  # the test steers something
    assert trainer.sampler.epoch_items(1, measured[1]) != trainer.sampler.epoch_items(1)


@pytest.mark.parametrize("stored", [True, False], ids=["stored-measure", "measured-on-resume"])
def test_resume_continues_the_steered_draw(tmp_path, tiny_backbone, stored):
    full = steered_trainer(tmp_path, tiny_backbone, "optim.epochs=3")
    full.train(tmp_path / "full")
    steered_trainer(tmp_path, tiny_backbone, "optim.epochs=1").train(tmp_path / "run")
    if not stored:  # a checkpoint without the measure (older run): the loaded tokens are measured again
        manifest = tmp_path / "run" / "checkpoints" / "epoch-1" / "mosaic.json"
        data = json.loads(manifest.read_text())
        del data["metrics"]["confusion"]
        manifest.write_text(json.dumps(data))
    events = []
    resumed = steered_trainer(tmp_path, tiny_backbone, "optim.epochs=3", events=events)
    resumed.train(tmp_path / "run", resume=True)
    measured_on_resume = [d["epoch"] for k, d in events if k == "confusion"]
    assert measured_on_resume == ([2, 3] if stored else [1, 2, 3])
    for key, tensor in full.tokens.named_tensors().items():
        assert torch.allclose(tensor, resumed.tokens.named_tensors()[key], atol=1e-5), key


def test_resume_with_another_refusal_prefix_measures_again(tmp_path, tiny_backbone):
    """A measure taken with another ``select.prefix_tokens`` is not what this run's probe would say."""
    steered_trainer(tmp_path, tiny_backbone, "optim.epochs=1").train(tmp_path / "run")
    events = []
    resumed = steered_trainer(
        tmp_path, tiny_backbone, "optim.epochs=2", "select.prefix_tokens=2", events=events
    )
    resumed.train(tmp_path / "run", resume=True)
    assert [d["epoch"] for k, d in events if k == "confusion"] == [1, 2]
    saved = json.loads((tmp_path / "run" / "checkpoints" / "epoch-2" / "mosaic.json").read_text())["metrics"]
    assert saved["confusion"]["settings"] == resumed.confusion_probe.settings
    assert saved["confusion"]["settings"]["prefix_tokens"] == 2


def test_a_measure_taken_on_resume_reads_the_averaged_tokens(tmp_path, tiny_backbone):
    """With ``optim.ema`` an epoch is measured on its averaged tokens (those its checkpoint ships);
    a resume that measures the epoch again must read the same ones, not the live tensors it
    restored for Adam."""
    from mosaic_safety.tokens import ControlTokens

    ema = ("optim.ema=0.5", "optim.lr=0.2")
    steered_trainer(tmp_path, tiny_backbone, "optim.epochs=1", *ema).train(tmp_path / "run")
    ckpt = ControlTokens.load(tmp_path / "run" / "checkpoints" / "epoch-1", tiny_backbone).named_tensors()
    resumed = steered_trainer(tmp_path, tiny_backbone, "optim.epochs=2", "select.prefix_tokens=2", *ema)
    seen = []
    measure = resumed._measure_confusion

    def spy(epoch):
        seen.append((epoch, {k: t.detach().clone() for k, t in resumed.tokens.named_tensors().items()}))
        return measure(epoch)

    resumed._measure_confusion = spy
    resumed.train(tmp_path / "run", resume=True)
    epoch, tokens = seen[0]
    assert epoch == 1
    for key, tensor in ckpt.items():
        assert torch.equal(tokens[key], tensor), key


def test_probe_size_is_part_of_the_recipe_and_the_validation_size_is_not(tmp_path, tiny_backbone):
    """``sampling.hard_negatives_per_group`` steers training, so a resume must keep it; a larger
    validation sample (``select.per_group``) only changes which epochs are shipped and leaves the
    stored measure alone."""
    select = ("select.mode=per_category", "select.per_group=2")
    steered_trainer(tmp_path, tiny_backbone, "optim.epochs=1", *select).train(tmp_path / "run")
    other = steered_trainer(tmp_path, tiny_backbone, "optim.epochs=2", "sampling.hard_negatives_per_group=3")
    assert other.confusion_probe.settings["per_group"] == 3
    with pytest.raises(ArtifactError, match="different config"):
        other.train(tmp_path / "run", resume=True)
    events = []
    resumed = steered_trainer(
        tmp_path,
        tiny_backbone,
        "optim.epochs=2",
        "select.mode=per_category",
        "select.per_group=3",
        events=events,
    )
    resumed.train(tmp_path / "run", resume=True)
    assert [d["epoch"] for k, d in events if k == "confusion"] == [2]  # epoch 1's stored measure is reused
    # epoch 2 validated as it ends; epoch 1, scored on 2 prompts, is scored again on 3 for the choice
    assert [d["epoch"] for k, d in events if k == "validation"] == [2, 1]


# --- mutation-testing round 2 (mut2): gap found in hard_negatives.py ---------------------------


def test_confusion_probe_sample_follows_the_seed():
    """The probe's prompts are a seeded sample: the same seed draws the same prompts (``--resume``
    reuses a stored measure only under the same settings), another seed another sample, and a
    group smaller than ``per_group`` is taken whole."""
    from mosaic_safety.training.hard_negatives import confusion_probe

    prompts = {"alcohol": [f"alcohol {i}" for i in range(40)], "betting": [f"bet {i}" for i in range(40)]}
    prompts["horror"] = ["boo", "eek"]
    prompts["sex"] = []
    refusals = {"alcohol": [5, 6, 7, 2], "betting": [8, 9, 2]}

    def probe(seed):
        return confusion_probe(prompts, ["alcohol", "betting"], refusals, 5, 2, seed)

    a = probe(0)
    assert a.groups == probe(0).groups and a.settings["seed"] == 0
    assert set(a.groups) == {"alcohol", "betting", "horror"}  # an empty group is left out
    assert sorted(a.groups["horror"]) == ["boo", "eek"] and len(a.groups["alcohol"]) == 5
    assert all(probe(seed).groups["alcohol"] != a.groups["alcohol"] for seed in (1, 2, 3))
    assert a.prefixes == {"alcohol": [5, 6], "betting": [8, 9]}
