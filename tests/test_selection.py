"""Checkpoint selection on the validation split: the probe, the choice, and the trainer's use of it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mosaic_safety.config import ConfigError, load_config
from mosaic_safety.controlled import ControlledModel
from mosaic_safety.data import load_suite
from mosaic_safety.policy import Policy
from mosaic_safety.tokens import ControlTokens
from mosaic_safety.training.selection import ValidationProbe, best_epochs, scores, selectivity


def tiny_config(tmp_path, *overrides):
    return load_config("configs/tiny-test.yaml", [f"output={tmp_path / 'run'}", *overrides])


def test_selectivity_is_own_minus_other_categories_minus_neutral():
    rates = {
        "a": {"a": 0.9, "b": 0.2, "c": 0.0, "neutral": 0.1},
        "b": {"a": 0.0, "b": 0.5, "c": 0.0, "neutral": 0.0},
    }
    assert selectivity(rates, "a") == pytest.approx(0.9 - 0.1 - 0.1)
    assert scores(rates) == {"a": pytest.approx(0.7), "b": pytest.approx(0.5)}


def test_best_epochs_choose_per_category_and_prefer_the_later_epoch_on_a_tie():
    history = {1: {"a": 0.2, "b": 0.6}, 2: {"a": 0.7, "b": 0.1}, 3: {"a": 0.7, "b": 0.5}}
    assert best_epochs(history, ["a", "b"]) == {"a": 3, "b": 1}
    with pytest.raises(ValueError, match="no validated epochs"):
        best_epochs({}, ["a"])
    with pytest.raises(ValueError, match="no validation score for category 'z'"):
        best_epochs(history, ["z"])


def test_probe_counts_exactly_what_greedy_decoding_opens_with(tiny_backbone, minors):
    """The teacher-forced probe equals real greedy decoding, prompt by prompt."""
    suite = load_suite("minors")
    cats = ["alcohol", "horror"]
    tokens = ControlTokens.initialise(
        minors, tiny_backbone.model.get_input_embeddings(), tiny_backbone.tokenizer, m=2, placement="user_end"
    )
    model = ControlledModel(tiny_backbone, tokens)
    probe = ValidationProbe.build(suite, cats, cats, {c: [1, 2, 3] for c in cats}, 4, 2, seed=0, batch_size=3)
    assert set(probe.groups) == {"alcohol", "horror", "neutral"} and probe.size == 2 * 12
    prompts = [p for rows in probe.groups.values() for p in rows]
    greedy = {}
    for c in cats:
        out = model.generate_ids(prompts, [Policy((c,))] * len(prompts), max_new_tokens=2)
        greedy[c] = [tuple(row[:2]) for row in out]
    # the refusal prefix each policy is probed with: what its first prompt greedily opens with,
    # so the expected rates are not all zero on a random model
    probe.prefixes = {c: list(greedy[c][0]) for c in cats}
    rates = probe.rates(model)
    for c in cats:
        for name, rows in probe.groups.items():
            expected = sum(greedy[c][prompts.index(p)] == tuple(probe.prefixes[c]) for p in rows) / len(rows)
            assert rates[c][name] == pytest.approx(expected), (c, name)
    assert any(rates[c][name] > 0 for c in cats for name in probe.groups)


def test_probe_needs_validation_prompts_for_every_group(tiny_backbone):
    suite = load_suite("minors")
    no_val = dataclasses.replace(
        suite, examples=[e for e in suite.examples if not (e.split == "val" and e.category == "horror")]
    )
    with pytest.raises(ConfigError, match="no 'val' prompts for horror"):
        ValidationProbe.build(no_val, ["alcohol", "horror"], ["alcohol"], {"alcohol": [1, 2]}, 4, 2, seed=0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("select.mode=best", "select.mode 'best': choose last | per_category"),
        ("select.per_group=0", "select.per_group must be at least 1"),
        ("select.prefix_tokens=0", "select.prefix_tokens must be at least 1"),
        ("select.mode=per_category method=lora_sft", "method 'lora_sft' ships its last epoch"),
    ],
)
def test_select_settings_are_checked(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *override.split())


def test_training_ships_each_category_from_its_best_validated_epoch(tmp_path, tiny_backbone):
    from mosaic_safety.training.trainer import Trainer

    cfg = tiny_config(
        tmp_path, "optim.epochs=3", "optim.lr=0.3", "select.mode=per_category", "select.per_group=3"
    )
    events = []
    trainer = Trainer(cfg, backbone=tiny_backbone, reporter=lambda kind, data: events.append((kind, data)))
    result = trainer.train(tmp_path / "run")
    run = tmp_path / "run"
    manifest = json.loads((run / "mosaic.json").read_text())
    chosen = manifest["training"]["selected_epochs"]
    history = {int(e): s for e, s in manifest["metrics"]["validation"]["scores"].items()}
    assert set(chosen) == set(trainer.categories) and set(history) == {1, 2, 3}
    assert chosen == best_epochs(history, trainer.categories) == result.training["selected_epochs"]
    shipped = ControlTokens.load(run, tiny_backbone.describe())
    for c, epoch in chosen.items():
        source = ControlTokens.load(run / "checkpoints" / f"epoch-{epoch}", tiny_backbone.describe())
        assert torch.equal(shipped.blocks[c], source.blocks[c]), c
        assert torch.equal(trainer.tokens.blocks[c], source.blocks[c]), c  # what the closing table sees
        ckpt = json.loads((run / "checkpoints" / f"epoch-{epoch}" / "mosaic.json").read_text())
        assert ckpt["metrics"]["validation"]["scores"][c] == pytest.approx(history[epoch][c])
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged if "validation" in r] == [1, 2, 3]
    assert [d["epoch"] for k, d in events if k == "validation"] == [1, 2, 3]
    assert any(k == "selected" for k, _ in events)


def test_selection_scores_an_older_run_when_resumed_with_it(tmp_path, tiny_backbone):
    """A run trained without selection gets it afterwards: its checkpoints are scored, none retrained."""
    from mosaic_safety.training.trainer import Trainer

    Trainer(tiny_config(tmp_path, "optim.lr=0.3"), backbone=tiny_backbone).train(tmp_path / "run")
    last = ControlTokens.load(tmp_path / "run", tiny_backbone.describe())
    events = []
    again = Trainer(
        tiny_config(tmp_path, "optim.lr=0.3", "select.mode=per_category", "select.per_group=3"),
        backbone=tiny_backbone,
        reporter=lambda kind, data: events.append((kind, data)),
    )
    result = again.train(tmp_path / "run", resume=True)
    assert not any(k == "step" for k, _ in events)  # nothing left to train
    assert [d["epoch"] for k, d in events if k == "validation"] == [1, 2]
    chosen = result.training["selected_epochs"]
    for c, epoch in chosen.items():
        source = last if epoch == 2 else ControlTokens.load(tmp_path / "run" / "checkpoints" / "epoch-1")
        assert torch.equal(again.tokens.blocks[c], source.blocks[c])


# --- mutation-testing round 2 (mut2) ------------------------------------------------------------


def test_neutral_counts_once_not_also_among_the_other_categories():
    """``neutral`` is subtracted on its own; averaging it into "other categories" as well would
    halve the other categories' weight and count neutral over-refusal twice."""
    from mosaic_safety.training.selection import other_categories_rate

    rates = {"a": {"a": 1.0, "b": 0.0, "neutral": 0.5}}
    assert other_categories_rate(rates["a"], "a") == 0.0
    assert selectivity(rates, "a") == pytest.approx(0.5)
    rates = {"a": {"a": 1.0, "b": 0.2, "c": 0.4, "neutral": 0.0}}
    assert other_categories_rate(rates["a"], "a") == pytest.approx(0.3)


def test_a_stored_validation_record_is_reused_only_with_the_same_probe_settings(tmp_path, tiny_backbone):
    """Resuming with another validation sample size scores the checkpoints again: scores measured
    on another sample are not comparable, so they must not decide the shipped epochs."""
    from mosaic_safety.training.checkpoint import checkpoint_dir
    from mosaic_safety.training.selection import stored_record
    from mosaic_safety.training.trainer import Trainer

    run = tmp_path / "run"
    cfg = tiny_config(tmp_path, "optim.lr=0.3", "select.mode=per_category", "select.per_group=3")
    first = Trainer(cfg, backbone=tiny_backbone)
    first.train(run)
    settings = dict(first.probe.settings)
    assert stored_record(checkpoint_dir(run, 1), settings)["settings"] == settings
    assert stored_record(checkpoint_dir(run, 1), {**settings, "per_group": 2}) is None
    assert stored_record(checkpoint_dir(run, 1), {**settings, "seed": settings["seed"] + 1}) is None

    events = []
    again = Trainer(
        tiny_config(tmp_path, "optim.lr=0.3", "select.mode=per_category", "select.per_group=2"),
        backbone=tiny_backbone,
        reporter=lambda kind, data: events.append((kind, data)),
    )
    again.train(run, resume=True)
    validated = [d for k, d in events if k == "validation"]
    assert [d["epoch"] for d in validated] == [1, 2]  # both checkpoints scored afresh
    assert all(d["settings"]["per_group"] == 2 for d in validated)


def test_refusal_prefix_stays_inside_the_refusal_text():
    """A refusal's ids end with EOS; the probe's prefix never includes it, however long it is asked
    to be (greedy decoding ending the refusal early is not "the trained refusal")."""
    from mosaic_safety.training.selection import refusal_prefixes

    refusals = {"a": [5, 6, 7, 2], "b": [9, 2]}
    assert refusal_prefixes(refusals, ["a", "b"], 2) == {"a": [5, 6], "b": [9]}
    assert refusal_prefixes(refusals, ["a", "b"], 10) == {"a": [5, 6, 7], "b": [9]}


def test_take_epochs_copies_each_categorys_deep_offsets_with_its_block(tmp_path, tiny_backbone, minors):
    """Deep prompt tuning: a category shipped from epoch e gets that epoch's per-layer offsets too,
    not the last epoch's offsets beside an earlier epoch's block."""
    from mosaic_safety.training.selection import take_epochs

    layers = tiny_backbone.model.config.num_hidden_layers
    emb = tiny_backbone.model.get_input_embeddings()

    def tokens(fill):
        t = ControlTokens.initialise(minors, emb, tiny_backbone.tokenizer, m=2, deep_layers=layers - 1)
        with torch.no_grad():
            for c in t.blocks:
                t.blocks[c].fill_(fill)
                t.deep[c].fill_(fill)
        return t

    for epoch in (1, 2):
        tokens(float(epoch)).save(tmp_path / f"epoch-{epoch}", tiny_backbone.describe())
    live = tokens(9.0)
    chosen = {"alcohol": 1, "betting": 2}
    take_epochs(live, chosen, lambda e: tmp_path / f"epoch-{e}", tiny_backbone.describe())
    for c, value in (("alcohol", 1.0), ("betting", 2.0), ("horror", 9.0)):
        assert torch.all(live.blocks[c] == value), c
        assert torch.all(live.deep[c] == value), c
