"""Sampler budgets, losses, the teacher cache, and the training loop on a tiny model."""

from __future__ import annotations

import json
import math
import shutil
import time
from math import comb
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mosaic_safety.config import ConfigError, load_config
from mosaic_safety.controlled import ControlledModel
from mosaic_safety.data.schema import DataError
from mosaic_safety.tokens import ArtifactError, read_manifest
from mosaic_safety.training.losses import response_cross_entropy, response_kl
from mosaic_safety.training.sampler import OrderSampler
from mosaic_safety.training.teacher import BaseResponseCache

CATS = ["a", "b", "c", "d", "e"]


def make_sampler(**kw):
    prompts = {c: [f"{c} prompt {i}" for i in range(30)] for c in CATS}
    neutral = [f"neutral {i}" for i in range(30)]
    boundary = [f"boundary {i}" for i in range(10)]
    return OrderSampler(CATS, prompts, neutral, boundary, **kw)


def test_budget_per_order_follows_the_paper_rule():
    s = make_sampler(max_order=4, per_subset=100)
    cap = 5 * 100  # the order-1 total
    for b in s.budgets:
        assert b.subsets == comb(5, b.order)
        assert b.positives_per_subset == min(100, cap // comb(5, b.order))
        assert b.negatives_per_subset == b.positives_per_subset
    assert [b.positives for b in s.budgets] == [500, 500, 500, 500]


def test_epoch_items_respect_the_policy():
    s = make_sampler(max_order=3, per_subset=8, neg_ratio=2.0, inactive_share=0.5)
    items = s.epoch_items(0)
    for item in items:
        if item.positive:
            assert item.category in item.policy  # positives come from an active category
        else:
            assert item.category not in item.policy  # negatives never from an active category
    pos = sum(i.positive for i in items)
    assert sum(not i.positive for i in items) == 2 * pos
    inactive = [i for i in items if not i.positive and i.category != "neutral"]
    assert 0.3 < len(inactive) / (len(items) - pos) < 0.7


def test_paired_sampling_gives_each_positive_a_contrastive_twin():
    s = make_sampler(max_order=5, per_subset=6, neg_ratio=0.5, inactive_share=0.0, paired=True)
    items = s.epoch_items(0)
    for b in s.budgets:  # the full policy (order 5 = K) leaves no category out: no twins there
        twins = b.positives_per_subset if b.order < 5 else 0
        assert b.negatives_per_subset == round(0.5 * b.positives_per_subset) + twins
    assert sum(b.positives + b.negatives for b in s.budgets) == len(items)
    negatives = {(i.prompt, i.policy.order) for i in items if not i.positive}
    for item in items:
        if item.positive and item.policy.order < 5:
            assert (item.prompt, item.policy.order) in negatives
        if not item.positive:
            assert item.category not in item.policy
    twins = [i for i in items if not i.positive and i.category != "neutral"]
    assert len(twins) == sum(i.positive and i.policy.order < 5 for i in items)  # inactive_share 0
    assert set(s.negative_prompts()) >= {p for c in CATS for p in s.prompts[c]}


def test_drawn_negatives_are_exactly_what_the_epochs_draw():
    s = make_sampler(max_order=3, per_subset=6)
    drawn = {e: {i.prompt for i in s.epoch_items(e) if not i.positive} for e in range(3)}
    assert s.drawn_negatives(range(3)) == sorted(drawn[0] | drawn[1] | drawn[2])
    assert s.drawn_negatives([2]) == sorted(drawn[2])  # a run resumed at its last epoch
    assert set(s.drawn_negatives(range(3))) <= set(s.negative_prompts())
    assert s.drawn_negatives([]) == []


def test_batches_are_single_order_and_seeded():
    s = make_sampler(max_order=3, per_subset=6)
    batches = s.epoch_batches(0, 4)
    assert all(len({i.policy.order for i in b}) == 1 for b in batches)
    assert len(batches) == s.steps_per_epoch(4)
    assert [i.prompt for b in batches for i in b] == [i.prompt for b in s.epoch_batches(0, 4) for i in b]
    assert [i.prompt for b in batches for i in b] != [i.prompt for b in s.epoch_batches(1, 4) for i in b]


def test_incremental_subsets_contain_a_new_category():
    s = make_sampler(max_order=2, per_subset=4, trainable=["e"])
    assert all("e" in subset for r in s.subsets for subset in s.subsets[r])
    assert [b.subsets for b in s.budgets] == [1, 4]


def test_sampler_errors():
    with pytest.raises(DataError, match="no training prompts for categories: b"):
        OrderSampler(["a", "b"], {"a": ["x"], "b": []}, ["n"], [])


def test_sampler_without_neutral_prompts_needs_every_negative_from_an_inactive_category():
    prompts = {c: [f"{c} prompt {i}" for i in range(30)] for c in CATS}
    for kw in ({"inactive_share": 0.5, "max_order": 2}, {"inactive_share": 1.0, "max_order": 5}):
        with pytest.raises(DataError, match="no neutral or boundary prompts for the negatives"):
            OrderSampler(CATS, prompts, [], [], **kw)
    sampler = OrderSampler(CATS, prompts, [], [], inactive_share=1.0, max_order=4, per_subset=3)
    items = [i for e in range(3) for i in sampler.epoch_items(e)]
    assert all(i.positive or i.category not in ("neutral",) for i in items) and items
    assert OrderSampler(CATS, prompts, [], [], neg_ratio=0.0).epoch_items(0)  # no negatives asked


def test_negative_counts_round_halves_up():
    # n(S) = 1 positive per subset; 0.5 negatives each is rounded to 1, 2.5 to 3 (round() gave 0 and 2)
    assert [b.negatives_per_subset for b in make_sampler(per_subset=1, neg_ratio=0.5).budgets] == [1, 1, 1]
    assert make_sampler(per_subset=1, neg_ratio=2.5).budgets[0].negatives_per_subset == 3


def test_cross_entropy_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [1, 2, 3, 4, -100]])
    ours = response_cross_entropy(logits, labels)
    ref0 = F.cross_entropy(logits[0, 1:3], labels[0, 1:3])
    ref1 = F.cross_entropy(logits[1, :4], labels[1, :4])
    assert torch.allclose(ours, torch.stack([ref0, ref1]), atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_kl_is_zero_for_equal_models_and_matches_reference(reverse):
    from mosaic_safety.training.losses import response_reverse_kl

    kl = response_reverse_kl if reverse else response_kl
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    labels = torch.tensor([[1, 1, -100, -100], [1, 1, 1, 1]])
    assert kl(teacher, teacher, labels).abs().max() < 1e-6
    p, q = teacher.softmax(-1), student.softmax(-1)
    ref = (q * (q.log() - p.log())).sum(-1) if reverse else (p * (p.log() - q.log())).sum(-1)
    expected = torch.stack([ref[0, :2].mean(), ref[1].mean()])
    assert torch.allclose(kl(student, teacher, labels), expected, atol=1e-5)


def test_reverse_kl_charges_mass_the_base_model_rules_out():
    from mosaic_safety.training.losses import response_reverse_kl

    # a flat base distribution, and a word it all but rules out moved to 0.3: forward KL stays
    # small, the reverse direction charges it at its log-ratio
    base = torch.zeros(1, 1, 9)
    base[0, 0, 8] = -12.0
    shifted = base.clone()
    shifted[0, 0, 8] = float(torch.log(torch.tensor(0.3 / 0.7 * 8)))
    one = torch.tensor([[0]])
    forward, reverse = response_kl(shifted, base, one), response_reverse_kl(shifted, base, one)
    assert float(forward) < 0.4 < 3.0 < float(reverse)


def test_greedy_margin_hinge_matches_reference_and_spares_safe_choices():
    from mosaic_safety.training.losses import response_margin

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9)
    labels = torch.tensor([[2, 5, -100, -100], [0, 1, 7, 3]])
    expected = []
    for row in range(2):
        hinges = []
        for pos in range(4):
            y = int(labels[row, pos])
            if y < 0:
                continue
            rival = max(float(logits[row, pos, j]) for j in range(9) if j != y)
            hinges.append(max(0.0, 1.5 - (float(logits[row, pos, y]) - rival)))
        expected.append(sum(hinges) / len(hinges))
    assert response_margin(logits, labels, 1.5).tolist() == pytest.approx(expected, abs=1e-5)
    safe = torch.full((1, 3, 9), -5.0)
    safe[0, torch.arange(3), torch.tensor([4, 2, 8])] = 5.0  # each label 10 logits ahead
    assert float(response_margin(safe, torch.tensor([[4, 2, 8]]), 1.0)) == 0.0
    assert float(response_margin(safe, torch.tensor([[2, 2, 8]]), 1.0)) == pytest.approx((11.0 + 0 + 0) / 3)


def test_teacher_cache_generates_once(tmp_path, tiny_backbone):
    cm = ControlledModel(tiny_backbone)
    calls = []
    original = cm.generate_ids
    cm.generate_ids = lambda *a, **k: calls.append(len(a[0])) or original(*a, **k)
    cache = BaseResponseCache(cm, tmp_path, max_new_tokens=4, batch_size=2)
    prompts = ["one", "two", "three"]
    assert cache.fill(prompts) == 3 and sum(calls) == 3
    again = BaseResponseCache(cm, tmp_path, max_new_tokens=4, batch_size=2)  # a new process, same disk
    assert again.fill(prompts) == 0 and sum(calls) == 3
    assert again.get("one") == cache.get("one")
    other = BaseResponseCache(cm, tmp_path, max_new_tokens=5)  # different decoding settings: new key
    assert other.missing(prompts) == sorted(prompts)


def test_teacher_cache_keys_on_dtype(tmp_path):
    """bf16 and fp32 greedy answers differ, though the fingerprint (by design) does not."""
    import copy

    from mosaic_safety.backbone import from_model
    from mosaic_safety.tiny import build_backbone

    fp32 = build_backbone()
    bf16 = from_model(copy.deepcopy(fp32.model).to(torch.bfloat16), fp32.tokenizer, fp32.name)
    assert bf16.fingerprint == fp32.fingerprint and bf16.output_key != fp32.output_key
    prompts = ["one", "two"]
    BaseResponseCache(ControlledModel(fp32), tmp_path, max_new_tokens=4).fill(prompts)
    assert BaseResponseCache(ControlledModel(fp32), tmp_path, max_new_tokens=4).missing(prompts) == []
    assert BaseResponseCache(ControlledModel(bf16), tmp_path, max_new_tokens=4).missing(prompts) == prompts


def test_teacher_cache_keys_on_every_weight_not_only_the_embeddings(tmp_path):
    """A fine-tune that kept its embeddings (a merged LoRA) shares the fingerprint, not the answers."""
    import copy

    from mosaic_safety.backbone import from_model
    from mosaic_safety.tiny import build_backbone

    base = build_backbone()
    tuned_model = copy.deepcopy(base.model)
    with torch.no_grad():
        tuned_model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    tuned = from_model(tuned_model, base.tokenizer, base.name)
    assert tuned.fingerprint == base.fingerprint and tuned.output_key != base.output_key
    prompts = ["one", "two"]
    BaseResponseCache(ControlledModel(base), tmp_path, max_new_tokens=4).fill(prompts)
    assert BaseResponseCache(ControlledModel(tuned), tmp_path, max_new_tokens=4).missing(prompts) == prompts


def test_generation_caches_key_on_the_chat_template(tiny_backbone):
    """The same weights under another chat template answer differently: a new cache key."""
    from mosaic_safety.backbone import from_model
    from mosaic_safety.tiny import CHATML, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = "You are terse.\n" + CHATML
    other = from_model(tiny_backbone.model, tokenizer, tiny_backbone.name)
    assert other.weights_key == tiny_backbone.weights_key and other.output_key != tiny_backbone.output_key


def test_generation_caches_key_on_the_template_as_rendered_now(tiny_backbone):
    """A template that prints the date shows the model another prompt tomorrow: evaluation caches
    (keyed on the method's fingerprint and the prompt's text) must not serve yesterday's answers."""
    from mosaic_safety.backbone import from_model
    from mosaic_safety.tiny import CHATML, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{{ strftime_now('%Y-%m-%d %H:%M:%S.%f') }}\n" + CHATML
    today = from_model(tiny_backbone.model, tokenizer, tiny_backbone.name)
    assert today.output_key == today.output_key  # rendered once: one run keeps one key
    tomorrow = from_model(tiny_backbone.model, tokenizer, tiny_backbone.name)
    assert tomorrow.output_key != today.output_key
    fixed = from_model(tiny_backbone.model, build_tokenizer(), tiny_backbone.name)
    assert fixed.output_key == tiny_backbone.output_key  # a template without a clock: a stable key


def test_teacher_cache_keys_on_the_rendered_prompt(tmp_path):
    """A template that writes the time renders a new prompt in a new process: a new base answer."""
    from mosaic_safety.backbone import from_model
    from mosaic_safety.tiny import CHATML, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{{ strftime_now('%Y-%m-%d %H:%M:%S.%f') }}\n" + CHATML
    backbone = from_model(build_model(tokenizer), tokenizer, "dated")
    first = ControlledModel(backbone)
    BaseResponseCache(first, tmp_path, max_new_tokens=4).fill(["one"])
    assert BaseResponseCache(first, tmp_path, max_new_tokens=4).missing(["one"]) == []  # same rendering
    later = ControlledModel(backbone)  # renders the prompt afresh, with a later time
    assert later.render("one") != first.render("one")
    assert BaseResponseCache(later, tmp_path, max_new_tokens=4).missing(["one"]) == ["one"]


def test_teacher_keeps_the_stop_token_the_model_generated(tmp_path):
    """Where the generation config lists several EOS ids (Llama 3), the target ends with the one
    that stopped the answer, not with the tokenizer's."""
    from mosaic_safety.backbone import from_model
    from mosaic_safety.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    prompt = "What is 17 times 23?"
    plain = ControlledModel(from_model(model, tokenizer, "t")).generate_ids(
        [prompt], [None], max_new_tokens=8
    )[0]
    stop = plain[3]
    assert stop != tokenizer.eos_token_id and stop not in plain[:3]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    cache = BaseResponseCache(ControlledModel(from_model(model, tokenizer, "t")), tmp_path, max_new_tokens=8)
    cache.fill([prompt])
    assert cache.get(prompt) == plain[:4]


def test_teacher_cache_appends_under_a_lock(tmp_path, tiny_backbone):
    """Two runs sharing the cache must not interleave their appends: a run waits for the other's."""
    import fcntl
    import threading

    cm = ControlledModel(tiny_backbone)
    cache = BaseResponseCache(cm, tmp_path, max_new_tokens=4)
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    with cache.path.open("a") as other_run:
        fcntl.flock(other_run.fileno(), fcntl.LOCK_EX)
        filling = threading.Thread(target=cache.fill, args=(["one", "two"],))
        filling.start()
        filling.join(timeout=3.0)
        assert filling.is_alive() and cache.path.read_text() == ""  # generated, waiting to append
        fcntl.flock(other_run.fileno(), fcntl.LOCK_UN)
    filling.join()
    assert BaseResponseCache(cm, tmp_path, max_new_tokens=4).missing(["one", "two"]) == []


def test_teacher_cache_regenerates_damaged_lines(tmp_path, tiny_backbone):
    cm = ControlledModel(tiny_backbone)
    cache = BaseResponseCache(cm, tmp_path, max_new_tokens=4)
    cache.fill(["one", "two", "three", "four"])
    good = {p: cache.get(p) for p in ("one", "two", "three", "four")}
    lines = {json.loads(line)["key"]: line for line in cache.path.read_bytes().splitlines(keepends=True)}
    four = lines[cache.key("four")]
    damaged = [
        b"\xff\xfe not text at all\n",  # undecodable bytes
        b"[1, 2, 3]\n",  # JSON, not an object
        json.dumps({"key": cache.key("two"), "ids": [[118, 345]]}).encode() + b"\n",  # ids not token ids
        json.dumps({"key": cache.key("three"), "ids": "12"}).encode() + b"\n",
        four[: len(four) // 2],  # "four" cut short by a crash
    ]
    cache.path.write_bytes(lines[cache.key("one")] + b"".join(damaged))
    again = BaseResponseCache(cm, tmp_path, max_new_tokens=4)
    assert again.missing(list(good)) == ["four", "three", "two"]
    assert again.fill(list(good)) == 3 and {p: again.get(p) for p in good} == good
    # the regenerated answers were appended on a line of their own, after the cut one
    assert BaseResponseCache(cm, tmp_path, max_new_tokens=4).missing(list(good)) == []


def tiny_config(tmp_path, *overrides):
    return load_config("configs/tiny-test.yaml", [f"output={tmp_path / 'run'}", *overrides])


def test_training_moves_only_the_control_tokens(tmp_path, tiny_backbone):
    from mosaic_safety.training.trainer import Trainer

    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    trainer = Trainer(tiny_config(tmp_path, "optim.epochs=1"), backbone=tiny_backbone)
    start = {n: b.detach().clone() for n, b in trainer.tokens.blocks.items()}
    result = trainer.train(tmp_path / "run")
    assert result.steps == trainer.sampler.steps_per_epoch(4)
    for k, v in tiny_backbone.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bitwise unchanged
    assert all(not p.requires_grad for p in tiny_backbone.model.parameters())
    assert any(not torch.equal(start[n], b) for n, b in trainer.tokens.blocks.items())
    assert (tmp_path / "run" / "mosaic.json").exists() and (tmp_path / "run" / "train_log.jsonl").exists()
    # a second run of the same object would start from these tokens and this optimizer state
    with pytest.raises(RuntimeError, match="already run"):
        trainer.train(tmp_path / "again")
    assert not (tmp_path / "again").exists()
    # a run refused before it touched anything does not use the Trainer up
    fresh = Trainer(tiny_config(tmp_path, "optim.epochs=1"), backbone=tiny_backbone)
    with pytest.raises(ArtifactError, match="already holds a training run"):
        fresh.train(tmp_path / "run")
    assert fresh.train(tmp_path / "run", overwrite=True).steps == result.steps


def test_refusal_loss_decreases(tmp_path, tiny_backbone):
    from mosaic_safety.training.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, "optim.lr=0.2"), backbone=tiny_backbone)
    trainer.prepare()
    batch = [i for i in trainer.sampler.epoch_items(0) if i.positive][:4]
    first = trainer.loss(batch)[0].item()
    for _ in range(15):
        loss, _ = trainer.loss(batch)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    assert trainer.loss(batch)[0].item() < first * 0.95  # no gradient would leave it unchanged


@pytest.mark.parametrize(
    "recipe", [(), ("tokens.deep=true", "optim.refusal_path_kl=1")], ids=["input", "deep"]
)
def test_resume_continues_from_the_last_checkpoint(tmp_path, tiny_backbone, recipe):
    from mosaic_safety.training.trainer import Trainer

    full = Trainer(tiny_config(tmp_path, "output=" + str(tmp_path / "full"), *recipe), backbone=tiny_backbone)
    full.train(tmp_path / "full")
    half = Trainer(tiny_config(tmp_path, "optim.epochs=1", *recipe), backbone=tiny_backbone)
    half.train(tmp_path / "run")
    # the first session's training time, as its checkpoint records it, set to a value no tiny run reaches
    manifest = tmp_path / "run" / "checkpoints" / "epoch-1" / "mosaic.json"
    data = json.loads(manifest.read_text())
    assert data["training"]["seconds"] > 0
    data["training"]["seconds"] = 1000.0
    manifest.write_text(json.dumps(data))
    # same recipe with 2 epochs, resumed from the epoch-1 checkpoint of the 1-epoch run
    resumed = Trainer(tiny_config(tmp_path, "optim.epochs=2", *recipe), backbone=tiny_backbone)
    started = time.time()
    result = resumed.train(tmp_path / "run", resume=True)
    assert result.steps == full.sampler.steps_per_epoch(4) * 2
    # the artifact records the whole run's time beside the whole run's steps
    assert 1000.0 <= result.seconds <= 1000.0 + time.time() - started
    assert json.loads((tmp_path / "run" / "mosaic.json").read_text())["training"]["seconds"] == round(
        result.seconds, 1
    )
    learned = resumed.tokens.named_tensors()
    assert any(k.startswith("deep.") for k in learned) == bool(recipe)
    for key, tensor in full.tokens.named_tensors().items():  # blocks, and deep offsets with their Adam state
        assert torch.allclose(tensor, learned[key], atol=1e-5), key


def test_a_resumed_log_lists_each_step_once(tmp_path, tiny_backbone):
    """Steps logged after the checkpoint a run resumes from are trained again: the log keeps one
    line per step, and a line a kill cut short is dropped."""
    import shutil

    from mosaic_safety.training.trainer import Trainer

    run = tmp_path / "run"
    Trainer(tiny_config(tmp_path, "optim.epochs=2", "log.every=1"), backbone=tiny_backbone).train(run)
    shutil.rmtree(run / "checkpoints" / "epoch-2")  # stopped during epoch 2, after logging some of it
    with (run / "train_log.jsonl").open("a") as log:
        log.write('{"step": 99, "lo')
    Trainer(tiny_config(tmp_path, "optim.epochs=2", "log.every=1"), backbone=tiny_backbone).train(
        run, resume=True
    )
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and len(steps) > 2


def test_resume_from_a_moved_run_and_an_older_config_schema(tmp_path, tiny_backbone):
    """A copied run directory resumes, and so does a checkpoint written before newer config fields."""
    import shutil

    from mosaic_safety.training.trainer import Trainer

    full = Trainer(tiny_config(tmp_path), backbone=tiny_backbone)
    full.train(tmp_path / "full")
    Trainer(tiny_config(tmp_path, "optim.epochs=1"), backbone=tiny_backbone).train(tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "moved")
    manifest = tmp_path / "moved" / "checkpoints" / "epoch-1" / "mosaic.json"
    data = json.loads(manifest.read_text())
    config = data["training"]["config"]
    del config["sampling"]["paired"]  # an older schema: a field added later, one removed since
    config["model"]["retired_field"] = False
    manifest.write_text(json.dumps(data))
    moved = tmp_path / "moved"
    resumed = Trainer(tiny_config(tmp_path, f"output={moved}", "optim.epochs=2"), backbone=tiny_backbone)
    result = resumed.train(moved, resume=True)
    assert result.steps == full.sampler.steps_per_epoch(4) * 2
    for name in full.tokens.categories:
        assert torch.allclose(full.tokens.blocks[name], resumed.tokens.blocks[name], atol=1e-5)


def test_incremental_training_keeps_old_tokens_bitwise(tmp_path, tiny_backbone):
    from mosaic_safety.tokens import ControlTokens
    from mosaic_safety.training.trainer import Trainer

    first = Trainer(
        tiny_config(tmp_path, "data.categories=alcohol,betting", "optim.epochs=1"), backbone=tiny_backbone
    )
    first.train(tmp_path / "first")
    old = ControlTokens.load(tmp_path / "first")
    second = Trainer(
        tiny_config(
            tmp_path, "data.categories=horror", "optim.epochs=1", f"init_artifact={tmp_path / 'first'}"
        ),
        backbone=tiny_backbone,
    )
    second.train(tmp_path / "second")
    new = ControlTokens.load(tmp_path / "second", tiny_backbone.describe())
    assert new.categories == ("alcohol", "betting", "horror")
    for name in ("alcohol", "betting"):
        assert torch.equal(new.blocks[name], old.blocks[name])
    assert all(item.policy and "horror" in item.policy for item in second.sampler.epoch_items(0))
    # the lineage: how the frozen tokens were trained stays in the extended artifact
    base = read_manifest(tmp_path / "second")["training"]["base"]
    assert base["tokens_sha256"] == read_manifest(tmp_path / "first")["tokens_sha256"]
    assert base["path"] == str((tmp_path / "first").resolve())
    assert base["training"]["config"]["data"]["categories"] == ["alcohol", "betting"]


@pytest.mark.parametrize("recipe", ["sampling.paired=true", "optim.positive_credit=own"])
def test_incremental_batches_that_reach_only_frozen_tokens_move_nothing(tmp_path, tiny_backbone, recipe):
    """One-row batches: a paired twin under a frozen category alone, or (own credit) a positive of a
    frozen category, has a loss no trained tensor enters; the step failed in backward."""
    from mosaic_safety.tokens import ControlTokens
    from mosaic_safety.training.trainer import Trainer

    base = tiny_config(tmp_path, "data.categories=alcohol,betting", "optim.epochs=1")
    Trainer(base, backbone=tiny_backbone).train(tmp_path / "first")
    old = ControlTokens.load(tmp_path / "first")
    overrides = ("data.categories=alcohol,betting,horror", "optim.batch_size=1", "optim.epochs=1", recipe)
    second = Trainer(
        tiny_config(tmp_path, *overrides, f"init_artifact={tmp_path / 'first'}"), backbone=tiny_backbone
    )
    frozen_only = [
        i
        for i in second.sampler.epoch_items(0)
        if "horror" not in i.policy or (recipe.endswith("own") and i.positive and i.category != "horror")
    ]
    assert frozen_only  # the run meets such a batch
    second.train(tmp_path / "second")
    new = ControlTokens.load(tmp_path / "second", tiny_backbone.describe())
    for name in ("alcohol", "betting"):
        assert torch.equal(new.blocks[name], old.blocks[name])


def test_incremental_resume_refuses_a_base_changed_since_and_a_reworded_refusal(tmp_path, tiny_backbone):
    """Resuming took the frozen tokens from the checkpoint while the manifest named the base as it is
    now: an overwritten base is refused instead of shipping the old tokens under its name."""
    from mosaic_safety.tokens import ArtifactError
    from mosaic_safety.training.trainer import Trainer

    def train(out, *overrides, resume=False):
        cfg = tiny_config(tmp_path, "optim.epochs=1", *overrides)
        return Trainer(cfg, backbone=tiny_backbone).train(tmp_path / out, resume=resume)

    train("first", "data.categories=alcohol")
    with pytest.raises(ArtifactError, match=r"its refusal differs \(data.refusal must be the base run's\)"):
        train(
            "x", "data.categories=horror", f"init_artifact={tmp_path / 'first'}", "data.refusal=No {display}."
        )
    train("second", "data.categories=horror", f"init_artifact={tmp_path / 'first'}")
    longer = ("data.categories=horror", f"init_artifact={tmp_path / 'first'}", "optim.epochs=2")
    shutil.rmtree(tmp_path / "first")
    train("first", "data.categories=alcohol", "optim.seed=7")  # the base overwritten since
    with pytest.raises(ArtifactError, match="first changed since this run started"):
        train("second", *longer, resume=True)
    shutil.rmtree(tmp_path / "first")
    train("first", "data.categories=alcohol,betting")  # a base with other categories
    with pytest.raises(ArtifactError, match="first changed since this run started"):
        train("second", *longer, resume=True)


def test_first_token_weight_reweights_the_decision_token():
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 1] = 4.0  # confident and right on the first token, uniform afterwards
    labels = torch.tensor([[1, 2, 2]])
    plain = response_cross_entropy(logits, labels)
    heavy = response_cross_entropy(logits, labels, first_weight=4.0)
    ce = F.cross_entropy(logits[0], labels[0], reduction="none")
    assert torch.allclose(plain, ce.mean().reshape(1))
    assert torch.allclose(heavy, ((4 * ce[0] + ce[1] + ce[2]) / 6).reshape(1))


def test_resume_refuses_a_different_recipe(tmp_path, tiny_backbone):
    from mosaic_safety.tokens import ArtifactError
    from mosaic_safety.training.trainer import Trainer

    Trainer(tiny_config(tmp_path, "optim.epochs=1"), backbone=tiny_backbone).train(tmp_path / "run")
    other = Trainer(tiny_config(tmp_path, "optim.lr=0.5"), backbone=tiny_backbone)
    with pytest.raises(ArtifactError, match=r"different config \(optim.lr 0.01 → 0.5\)"):
        other.train(tmp_path / "run", resume=True)


def test_resume_refuses_a_run_that_trained_in_another_resolved_dtype(tmp_path, tiny_backbone):
    """``auto`` is bf16 on a GPU and float32 on a CPU: the config reads the same on both machines,
    so the checkpoint records the dtype it trained in and a resume elsewhere is refused."""
    from mosaic_safety.tokens import ArtifactError
    from mosaic_safety.training.trainer import Trainer

    Trainer(tiny_config(tmp_path, "optim.epochs=1"), backbone=tiny_backbone).train(tmp_path / "run")
    manifest = tmp_path / "run" / "checkpoints" / "epoch-1" / "mosaic.json"
    record = json.loads(manifest.read_text())
    assert record["training"]["dtype"] == "float32"
    record["training"]["dtype"] = "bfloat16"  # as a GPU run with model.dtype=auto writes it
    manifest.write_text(json.dumps(record))
    again = Trainer(tiny_config(tmp_path, "optim.epochs=2"), backbone=tiny_backbone)
    with pytest.raises(
        ArtifactError, match=r"trained in bfloat16; this one would go on in float32 .*=bfloat16"
    ):
        again.train(tmp_path / "run", resume=True)


def test_resume_refuses_a_damaged_training_record_with_a_clear_error(tmp_path, tiny_backbone):
    """A checkpoint's manifest whose ``training`` record was cut or edited (no record, no config, a
    section or the seconds of the wrong type) ended ``--resume`` in a KeyError, AttributeError or
    ValueError traceback; it is an ArtifactError that names the checkpoint, and nothing is written."""
    from mosaic_safety.tokens import ArtifactError
    from mosaic_safety.training.trainer import Trainer

    Trainer(tiny_config(tmp_path, "optim.epochs=1"), backbone=tiny_backbone).train(tmp_path / "run")
    manifest = tmp_path / "run" / "checkpoints" / "epoch-1" / "mosaic.json"
    good = json.loads(manifest.read_text())
    log = (tmp_path / "run" / "train_log.jsonl").read_bytes()
    damages = {
        "no 'training' record": lambda m: m.pop("training"),
        "no 'training.config'": lambda m: m["training"].pop("config"),
        "'training.config' is not a mapping": lambda m: m["training"].__setitem__("config", [1]),
        "'training.config.optim' is not a mapping": lambda m: m["training"]["config"].__setitem__("optim", 5),
        "'training.seconds' is 'x'": lambda m: m["training"].__setitem__("seconds", "x"),
        "'training.base' is not a mapping": lambda m: m["training"].__setitem__("base", [1]),
    }
    for problem, damage in damages.items():
        record = json.loads(json.dumps(good))
        damage(record)
        manifest.write_text(json.dumps(record))
        again = Trainer(tiny_config(tmp_path, "optim.epochs=2"), backbone=tiny_backbone)
        with pytest.raises(ArtifactError, match=rf"epoch-1: damaged checkpoint \({problem}"):
            again.train(tmp_path / "run", resume=True)
        assert (tmp_path / "run" / "train_log.jsonl").read_bytes() == log


def test_resume_accepts_another_spelling_of_the_same_device_and_dtype(tmp_path):
    """``auto`` is the dtype it stands for, and the device holding the weights changes no step: a
    run started on ``cuda`` resumes on ``cuda:1``; one in bfloat16 does not resume in float32."""
    from mosaic_safety.tokens import ArtifactError
    from mosaic_safety.training.checkpoint import check_same_recipe

    def config(**model):
        return tiny_config(tmp_path, *(f"model.{k}={v}" for k, v in model.items())).to_dict()

    saved = config(device="cpu", dtype="auto")
    check_same_recipe(tmp_path, saved, config(device="cpu", dtype="float32"))
    check_same_recipe(tmp_path, saved, config(device="auto", dtype="float32"))
    cuda = {**saved, "model": {**saved["model"], "device": "cuda", "dtype": "bfloat16"}}
    check_same_recipe(
        tmp_path, cuda, {**cuda, "model": {**cuda["model"], "device": "cuda:1", "dtype": "auto"}}
    )
    with pytest.raises(ArtifactError, match="model.dtype 'float32' → 'bfloat16'"):
        check_same_recipe(tmp_path, saved, config(device="cpu", dtype="bfloat16"))


def test_resume_refuses_edited_prompts_fewer_epochs_and_a_damaged_checkpoint(tmp_path, tiny_backbone):
    import shutil

    import mosaic_safety.data
    from mosaic_safety.tokens import ArtifactError
    from mosaic_safety.training.trainer import Trainer

    suite = tmp_path / "suite"
    shutil.copytree(Path(mosaic_safety.data.__file__).parent / "builtin" / "minors", suite)
    Trainer(tiny_config(tmp_path, f"data.suite={suite}"), backbone=tiny_backbone).train(tmp_path / "run")
    # an edited training prompt: the run would go on with other data than it started with
    path = suite / "alcohol.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        if row["split"] == "train":
            row["prompt"] += " (edited)"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited = Trainer(tiny_config(tmp_path, f"data.suite={suite}", "optim.epochs=3"), backbone=tiny_backbone)
    with pytest.raises(ArtifactError, match="trained on other prompts"):
        edited.train(tmp_path / "run", resume=True)
    shutil.rmtree(suite)
    shutil.copytree(Path(mosaic_safety.data.__file__).parent / "builtin" / "minors", suite)
    fewer = Trainer(tiny_config(tmp_path, f"data.suite={suite}", "optim.epochs=1"), backbone=tiny_backbone)
    with pytest.raises(ArtifactError, match="has trained 2 epochs; optim.epochs=1 cannot undo them"):
        fewer.train(tmp_path / "run", resume=True)
    optimizer = tmp_path / "run" / "checkpoints" / "epoch-2" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # cut short
    longer = Trainer(tiny_config(tmp_path, f"data.suite={suite}", "optim.epochs=3"), backbone=tiny_backbone)
    with pytest.raises(ArtifactError, match="unreadable checkpoint \\(SafetensorError.*delete that folder"):
        longer.train(tmp_path / "run", resume=True)
    shutil.rmtree(optimizer.parent)  # as the message says: the run resumes from epoch 1 and finishes
    longer = Trainer(tiny_config(tmp_path, f"data.suite={suite}", "optim.epochs=3"), backbone=tiny_backbone)
    longer.train(tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "checkpoints" / "epoch-3").is_dir()


def test_learning_rate_schedules():
    from mosaic_safety.training.schedule import FLOOR, lr_at

    assert [lr_at(s, 10, 0.1) for s in (0, 5, 9)] == [0.1, 0.1, 0.1]
    cosine = [lr_at(s, 11, 0.1, "cosine") for s in range(11)]
    assert cosine[0] == pytest.approx(0.1) and cosine[-1] == pytest.approx(0.1 * FLOOR)
    assert cosine[5] == pytest.approx(0.1 * (FLOOR + (1 - FLOOR) / 2))
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert lr_at(10, 11, 0.1, "linear") == pytest.approx(0.1 * FLOOR)
    warm = [lr_at(s, 20, 0.1, "cosine", warmup=4) for s in range(6)]
    assert warm[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1]) and warm[4] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(3, 10, 0.1, "step")


def test_schedule_is_validated_and_logged(tmp_path, tiny_backbone):
    from mosaic_safety.config import ConfigError
    from mosaic_safety.training.trainer import Trainer

    with pytest.raises(ConfigError, match="optim.schedule"):
        tiny_config(tmp_path, "optim.schedule=step")
    run = tmp_path / "run"
    Trainer(tiny_config(tmp_path, "optim.schedule=cosine", "log.every=1"), backbone=tiny_backbone).train(run)
    rates = [json.loads(line)["lr"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert rates[0] > rates[-1] and all(a >= b for a, b in zip(rates, rates[1:]))


def test_a_fresh_run_never_mixes_with_an_earlier_one(tmp_path, tiny_backbone):
    from mosaic_safety.tokens import ArtifactError
    from mosaic_safety.training.trainer import Trainer

    run = tmp_path / "run"
    Trainer(tiny_config(tmp_path, "optim.epochs=2"), backbone=tiny_backbone).train(run)
    (run / "notes.txt").write_text("mine")
    before = (run / "tokens.safetensors").read_bytes()
    with pytest.raises(ArtifactError, match="--overwrite"):
        Trainer(tiny_config(tmp_path, "optim.epochs=1"), backbone=tiny_backbone).train(run)
    assert (run / "tokens.safetensors").read_bytes() == before  # refused before touching anything
    result = Trainer(tiny_config(tmp_path, "optim.epochs=1"), backbone=tiny_backbone).train(
        run, overwrite=True
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-1"]  # no stale epoch-2
    logged = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert max(logged) == result.steps and logged == sorted(logged)  # the new run's log only
    assert (run / "notes.txt").read_text() == "mine"  # files that are not the run's stay


def test_a_diverged_run_is_an_error_not_an_unloadable_artifact(tmp_path, tiny_backbone):
    """A finite but huge loss weight sends the tokens to NaN: the run used to end as a success with
    an artifact (and checkpoint) that `mosaic info` and every loader refused."""
    from mosaic_safety.tokens import ArtifactError
    from mosaic_safety.training.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, "optim.first_token_weight=1e300"), backbone=tiny_backbone)
    with pytest.raises(ArtifactError, match=r"training diverged at step \d+ \(loss (nan|inf)\)"):
        trainer.train(tmp_path / "run")
    assert not (tmp_path / "run" / "mosaic.json").exists()
    assert not list((tmp_path / "run").glob("checkpoints/*/trainer_state.json"))


def test_norm_cap_keeps_control_vectors_at_token_scale(tmp_path, tiny_backbone):
    from mosaic_safety.config import ConfigError
    from mosaic_safety.training.trainer import Trainer, vocab_max_norm

    limit = 0.5 * vocab_max_norm(tiny_backbone.model.get_input_embeddings())
    norms = {}
    for cap in ("0", "0.5"):
        trainer = Trainer(
            tiny_config(tmp_path, "optim.epochs=1", "optim.lr=0.5", f"tokens.norm_cap={cap}"),
            backbone=tiny_backbone,
        )
        trainer.train(tmp_path / f"cap{cap}")
        norms[cap] = max(float(b.detach().norm(dim=-1).max()) for b in trainer.tokens.blocks.values())
    assert norms["0"] > limit  # without the cap this lr leaves token scale...
    assert norms["0.5"] <= limit + 1e-5  # ...with it no vector ends above the cap
    with pytest.raises(ConfigError, match="norm_cap"):
        tiny_config(tmp_path, "tokens.norm_cap=-1")


def test_block_overlap_measures_shared_mean_directions():
    from mosaic_safety.training.losses import block_overlap

    e = torch.eye(4)
    assert float(block_overlap([e[:2], e[2:]])) == 0.0  # means (1,1,0,0) and (0,0,1,1): orthogonal
    assert float(block_overlap([e[:2], 3 * e[:2]])) == pytest.approx(1.0)  # same direction, any norm
    a, b, c = e[[0]], e[[1]], (e[0] + e[1]).reshape(1, 4)
    assert float(block_overlap([a, b, c])) == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert float(block_overlap([a])) == 0.0


def test_block_orthogonality_pulls_category_blocks_apart(tmp_path, tiny_backbone):
    from mosaic_safety.config import ConfigError
    from mosaic_safety.training.losses import block_overlap
    from mosaic_safety.training.trainer import Trainer

    overlap = {}
    for weight in ("0", "5"):
        trainer = Trainer(
            tiny_config(
                tmp_path, "optim.epochs=1", "tokens.init=vocab", f"optim.block_orthogonality={weight}"
            ),
            backbone=tiny_backbone,
        )
        trainer.train(tmp_path / f"w{weight}")
        overlap[weight] = float(block_overlap([b.detach() for b in trainer.tokens.blocks.values()]))
        logged = json.loads((tmp_path / f"w{weight}" / "train_log.jsonl").read_text().splitlines()[-1])
        assert ("overlap" in logged) == (weight != "0")
    assert overlap["5"] < overlap["0"]
    with pytest.raises(ConfigError, match="block_orthogonality"):
        tiny_config(tmp_path, "optim.block_orthogonality=-1")


def test_deep_training_moves_tokens_and_offsets_and_resumes(tmp_path, tiny_backbone):
    from mosaic_safety.tokens import ControlTokens
    from mosaic_safety.training.trainer import Trainer

    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    full = Trainer(tiny_config(tmp_path, "tokens.deep=true"), backbone=tiny_backbone)
    assert full.tokens.deep_layers == 1 and len(full.trainable) == 2 * len(full.tokens.categories)
    full.train(tmp_path / "full")
    for k, v in tiny_backbone.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the backbone stays bitwise frozen
    saved = ControlTokens.load(tmp_path / "full", tiny_backbone.describe())
    assert all(o.abs().max() > 0 for o in saved.deep.values())  # offsets start at 0: they were trained
    state = load_file(str(tmp_path / "full" / "checkpoints" / "epoch-1" / "optimizer.safetensors"))
    assert {"deep.alcohol.exp_avg", "alcohol.exp_avg"} <= set(state)
    Trainer(tiny_config(tmp_path, "tokens.deep=true", "optim.epochs=1"), backbone=tiny_backbone).train(
        tmp_path / "run"
    )
    resumed = Trainer(tiny_config(tmp_path, "tokens.deep=true", "optim.epochs=2"), backbone=tiny_backbone)
    resumed.train(tmp_path / "run", resume=True)
    for key, tensor in full.tokens.named_tensors().items():
        assert torch.allclose(tensor, resumed.tokens.named_tensors()[key], atol=1e-5), key


def test_incremental_training_keeps_deep_offsets_and_their_kind(tmp_path, tiny_backbone):
    from mosaic_safety.tokens import ArtifactError, ControlTokens
    from mosaic_safety.training.trainer import Trainer

    first = tmp_path / "first"
    Trainer(
        tiny_config(tmp_path, "data.categories=alcohol", "optim.epochs=1", "tokens.deep=true"),
        backbone=tiny_backbone,
    ).train(first)
    old = ControlTokens.load(first)
    with pytest.raises(ArtifactError, match="deep tokens, but the config asks for tokens.deep=False"):
        Trainer(
            tiny_config(tmp_path, "data.categories=horror", f"init_artifact={first}"), backbone=tiny_backbone
        )
    second = Trainer(
        tiny_config(
            tmp_path, "data.categories=horror", "optim.epochs=1", "tokens.deep=true", f"init_artifact={first}"
        ),
        backbone=tiny_backbone,
    )
    second.train(tmp_path / "second")
    new = ControlTokens.load(tmp_path / "second")
    assert torch.equal(new.deep["alcohol"], old.deep["alcohol"]) and torch.equal(
        new.blocks["alcohol"], old.blocks["alcohol"]
    )
    assert new.deep["horror"].abs().max() > 0


def test_refusal_path_kl_follows_the_policys_templates(tmp_path, tiny_backbone):
    """The extra negative term: KL(base || controlled) along a refusal template of the row's policy."""
    from mosaic_safety.config import ConfigError
    from mosaic_safety.policy import Policy
    from mosaic_safety.training.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, "optim.refusal_path_kl=2"), backbone=tiny_backbone)
    trainer.prepare()
    negatives = [i for i in trainer.sampler.epoch_items(0) if not i.positive and i.policy.order >= 2][:3]
    heads = trainer.model.prefill_heads([i.prompt for i in negatives])
    got = trainer._refusal_path_kl(negatives, heads)
    for j, item in enumerate(negatives):
        template = trainer._refusals[item.policy.categories[j % len(item.policy.categories)]]
        with torch.no_grad():
            ctrl, labels = trainer.model.response_logits([item.prompt], [item.policy], [template])
            base, _ = trainer.model.response_logits([item.prompt], [Policy(())], [template])
        assert torch.allclose(got[j], response_kl(ctrl, base, labels)[0], atol=1e-5)
    assert float(got.detach().min()) > 0  # untrained tokens still move the distribution
    got.sum().backward()
    touched = {c for i in negatives for c in i.policy.categories}
    assert {n for n, b in trainer.tokens.blocks.items() if b.grad is not None} == touched
    trainer.tokens.zero_grad()
    loss, stats = trainer.loss(negatives)
    plain = Trainer(tiny_config(tmp_path), backbone=tiny_backbone).loss(negatives)[0]
    assert "path_kl" in stats and float(loss.detach()) == pytest.approx(
        float(plain.detach()) + 2 * float(got.detach().mean()), rel=1e-4
    )
    with pytest.raises(ConfigError, match="refusal_path_kl"):
        tiny_config(tmp_path, "optim.refusal_path_kl=-1")


def test_refusal_wording_from_the_recipe_is_trained_and_recorded(tmp_path, tiny_backbone):
    """data.refusal replaces every category's template: positives target it, the artifact keeps it."""
    from mosaic_safety.tokens import ArtifactError, ControlTokens
    from mosaic_safety.training.trainer import Trainer, response_ids

    wording = "Sorry, I can't help with {display} here."
    trainer = Trainer(
        tiny_config(tmp_path, "optim.epochs=1", f"data.refusal={wording}"), backbone=tiny_backbone
    )
    tok = tiny_backbone.tokenizer
    assert trainer._refusals["betting"] == response_ids(
        tok, "Sorry, I can't help with gambling and betting here."
    )
    trainer.train(tmp_path / "run")
    saved = ControlTokens.load(tmp_path / "run", tiny_backbone.describe())
    assert {saved.registry[c].refusal for c in trainer.categories} == {wording}
    with pytest.raises(ArtifactError, match="not defined identically"):  # the suite's own wording differs
        Trainer(
            tiny_config(
                tmp_path / "more", f"init_artifact={tmp_path / 'run'}", "data.categories=alcohol,sex"
            ),
            backbone=tiny_backbone,
        ).prepare()


def test_deep_offsets_take_their_own_learning_rate(tmp_path, tiny_backbone):
    """Adam's first step moves each element by the rate: lr for the blocks, lr * deep_lr_scale for offsets."""
    from mosaic_safety.config import ConfigError
    from mosaic_safety.training.schedule import set_lr
    from mosaic_safety.training.trainer import Trainer, optimizer_step

    trainer = Trainer(
        tiny_config(
            tmp_path, "tokens.deep=true", "optim.lr=0.01", "optim.deep_lr_scale=3", "optim.grad_clip=0"
        ),
        backbone=tiny_backbone,
    )
    trainer.prepare()
    set_lr(trainer.optimizer, 0.005)  # what the schedule does each step: the scale must survive it
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.005, 0.015])
    before = {k: v.detach().clone() for k, v in trainer.tokens.named_tensors().items()}
    items = trainer.sampler.epoch_items(0)[:4]
    optimizer_step(trainer.loss(items)[0], trainer.optimizer, trainer.trainable, 0)
    moved = {
        k: float((v.detach() - before[k]).abs().max()) for k, v in trainer.tokens.named_tensors().items()
    }
    touched = {c for i in items for c in i.policy.categories}
    assert touched
    for name in touched:
        assert moved[f"category.{name}"] == pytest.approx(0.005, rel=1e-2)
        assert moved[f"deep.{name}"] == pytest.approx(0.015, rel=1e-2)
    with pytest.raises(ConfigError, match="deep_lr_scale"):
        tiny_config(tmp_path, "tokens.deep=true", "optim.deep_lr_scale=0")
    with pytest.raises(ConfigError, match="needs tokens.deep=true"):  # a scale that would do nothing
        tiny_config(tmp_path, "tokens.deep=false", "optim.deep_lr_scale=2")


def test_bf16_autocast_trains_float32_tokens_over_the_frozen_model(tmp_path, tiny_backbone):
    """``optim.autocast=bfloat16`` casts the passes, not the state: tokens, gradients and saved
    artifact stay float32, the backbone stays bitwise frozen, and the loss is the float32 one up to
    bf16 rounding (it differs from it, so the cast really happened)."""
    from mosaic_safety.config import ConfigError
    from mosaic_safety.tokens import ControlTokens
    from mosaic_safety.training.trainer import Trainer, training_autocast

    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    trainer = Trainer(
        tiny_config(tmp_path, "optim.epochs=1", "tokens.deep=true", "optim.autocast=bfloat16"),
        backbone=tiny_backbone,
    )
    trainer.prepare()
    items = trainer.sampler.epoch_items(0)[:6]
    with torch.no_grad():
        full = float(trainer.loss(items)[0])
        with training_autocast(trainer.model.device, "bfloat16"):
            half = float(trainer.loss(items)[0])
    assert half != full
    assert half == pytest.approx(full, rel=0.05)

    result = trainer.train(tmp_path / "run")
    assert result.steps > 0 and math.isfinite(result.final_loss)
    for k, v in tiny_backbone.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    saved = ControlTokens.load(tmp_path / "run", backbone=tiny_backbone.describe())
    assert all(t.dtype == torch.float32 for t in saved.named_tensors().values())
    with pytest.raises(ConfigError, match="autocast"):
        tiny_config(tmp_path, "optim.autocast=float8")


def test_bf16_backbone_trains_float32_tokens(tmp_path):
    """``model.dtype=bfloat16`` on CPU (fast with AMX, docs/experiments.md): the backbone runs and
    stays frozen in bf16, while the tokens, their saved artifact and its use on a float32 backbone
    stay float32, and the empty policy still gives the bf16 base model's logits exactly."""
    from mosaic_safety.backbone import load_backbone
    from mosaic_safety.controlled import ControlledModel
    from mosaic_safety.tokens import ControlTokens
    from mosaic_safety.training.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, "optim.epochs=1", "tokens.deep=true", "model.dtype=bfloat16"))
    backbone = trainer.backbone
    assert backbone.dtype == torch.bfloat16
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    result = trainer.train(tmp_path / "run")
    assert result.steps > 0 and math.isfinite(result.final_loss)
    for k, v in backbone.model.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, before[k]), k

    saved = ControlTokens.load(tmp_path / "run", backbone=load_backbone("tiny-random-llama").describe())
    assert all(t.dtype == torch.float32 for t in saved.named_tensors().values())
    prompts = ["How do I bake bread?", "Tell me a story"]
    controlled = ControlledModel(backbone, saved)
    with torch.no_grad():
        empty = controlled.next_token_logits(prompts, [None, None])
        plain = ControlledModel(backbone).next_token_logits(prompts, [None, None])
        steered = controlled.next_token_logits(prompts, ["betting", "betting"])
    assert torch.equal(empty, plain) and not torch.equal(steered, plain)


@pytest.mark.parametrize(
    ("knob", "stat", "extra", "bad"),
    [
        ("greedy_margin", "margin", (), ("optim.greedy_margin=-1", "optim.greedy_margin_value=0")),
        # the reverse direction needs the teacher pass even with the paper's forward KL off
        ("reverse_kl", "reverse_kl", ("optim.kl_weight=0",), ("optim.reverse_kl=-1",)),
    ],
)
def test_negative_loss_options_join_the_loss_and_are_checked(tmp_path, tiny_backbone, knob, stat, extra, bad):
    from mosaic_safety.config import ConfigError
    from mosaic_safety.training.trainer import Trainer

    trainer = Trainer(tiny_config(tmp_path, f"optim.{knob}=2", *extra), backbone=tiny_backbone)
    trainer.prepare()
    items = trainer.sampler.epoch_items(0)[:8]
    assert any(not i.positive for i in items)
    with torch.no_grad():
        with_term, stats = trainer.loss(items)
        setattr(trainer.config.optim, knob, 0.0)
        without, plain = trainer.loss(items)
    negatives = sum(not i.positive for i in items)
    assert stats[stat] > 0 and stat not in plain
    assert float(with_term - without) == pytest.approx(2 * stats[stat] * negatives / len(items), rel=1e-4)
    for override in bad:
        with pytest.raises(ConfigError, match=knob):
            tiny_config(tmp_path, override)


@pytest.mark.parametrize("deep", [False, True])
def test_own_credit_sends_a_positives_gradient_to_its_own_category_only(tmp_path, tiny_backbone, deep):
    """``optim.positive_credit=own``: a co-active category's tokens get no gradient from a prompt
    they are not about, while negatives still reach every active category and the loss is unchanged."""
    from mosaic_safety.config import ConfigError
    from mosaic_safety.training.trainer import Trainer

    overrides = [f"tokens.deep={str(deep).lower()}", "optim.refusal_path_kl=1"]
    own = Trainer(tiny_config(tmp_path, "optim.positive_credit=own", *overrides), backbone=tiny_backbone)
    shared = Trainer(tiny_config(tmp_path, *overrides), backbone=tiny_backbone)
    own.prepare()
    shared.prepare()
    items = own.sampler.epoch_items(0)
    positive = next(i for i in items if i.positive and i.policy.order >= 2)
    negative = next(i for i in items if not i.positive and i.policy.order >= 2)
    for trainer in (own, shared):
        trainer.tokens.zero_grad()
        trainer.loss([positive])[0].backward()
    got = {n for n, b in own.tokens.blocks.items() if b.grad is not None and b.grad.abs().max() > 0}
    assert got == {positive.category}
    if deep:
        assert {n for n, o in own.tokens.deep.items() if o.grad is not None and o.grad.abs().max() > 0} == got
    reached = {n for n, b in shared.tokens.blocks.items() if b.grad is not None and b.grad.abs().max() > 0}
    assert reached == set(positive.policy.categories) and len(reached) >= 2
    assert torch.equal(
        own.tokens.blocks[positive.category].grad, shared.tokens.blocks[positive.category].grad
    )
    own.tokens.zero_grad()
    loss = own.loss([positive, negative])[0]
    assert float(loss.detach()) == pytest.approx(
        float(shared.loss([positive, negative])[0].detach()), rel=1e-6
    )
    loss.backward()
    reached = {n for n, b in own.tokens.blocks.items() if b.grad is not None and b.grad.abs().max() > 0}
    assert reached == {positive.category} | set(negative.policy.categories)
    with pytest.raises(ConfigError, match="positive_credit"):
        tiny_config(tmp_path, "optim.positive_credit=some")


def test_target_tokens_train_on_the_first_tokens_only(tmp_path, tiny_backbone):
    from mosaic_safety.training.trainer import Trainer

    recipe = ("tokens.deep=true", "optim.refusal_path_kl=1")
    whole = Trainer(tiny_config(tmp_path, *recipe), backbone=tiny_backbone)
    cut = Trainer(tiny_config(tmp_path, *recipe, "optim.target_tokens=2"), backbone=tiny_backbone)
    for trainer in (whole, cut):
        trainer.prepare()
    batch = trainer.sampler.epoch_items(0)[:8]
    assert {item.positive for item in batch} == {True, False}
    long, short = whole._targets(batch), cut._targets(batch)
    assert max(map(len, long)) > 2
    assert short == [t[:2] for t in long]
    # the loss is that of the whole recipe on the cut targets: the positives' CE over two tokens
    positives = [item for item in batch if item.positive]
    logits, labels = cut.model.response_logits(
        [i.prompt for i in positives],
        [i.policy for i in positives],
        [t[:2] for t in whole._targets(positives)],
    )
    expected = response_cross_entropy(logits, labels).mean()
    assert cut.loss(positives)[0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert cut.loss(positives)[0].item() != pytest.approx(whole.loss(positives)[0].item(), rel=1e-3)
    with pytest.raises(ConfigError, match="target_tokens"):
        tiny_config(tmp_path, "optim.target_tokens=-1")


def test_a_max_order_above_the_categories_is_said_not_silently_clamped(tmp_path, tiny_backbone):
    from mosaic_safety.training.trainer import Trainer

    events = []
    config = tiny_config(tmp_path, "sampling.max_order=5", "optim.epochs=1")
    trainer = Trainer(config, backbone=tiny_backbone, reporter=lambda kind, data: events.append((kind, data)))
    trainer.train(tmp_path / "run")
    stages = [d["name"] for k, d in events if k == "stage"]
    assert "sampling.max_order=5 is above the 3 categories: orders 1 to 3 are trained" in stages
    assert [b["order"] for k, d in events if k == "budgets" for b in d["budgets"]] == [1, 2, 3]


# -- training/losses.py: behaviour a mutation audit found unpinned ------------------------------
def test_first_token_weight_finds_the_first_response_token_after_leading_padding():
    """``encode``'s labels (the LoRA / ORPO losses) are end-aligned: a short row starts with -100,
    and the weighted token must be its first real one, not index 0."""
    import torch.nn.functional as F

    from mosaic_safety.training.losses import response_cross_entropy

    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 1, 2, 3]])
    ce = F.cross_entropy(logits[0, 1:], labels[0, 1:], reduction="none")
    heavy = response_cross_entropy(logits, labels, first_weight=4.0)
    assert torch.allclose(heavy, ((4 * ce[0] + ce[1] + ce[2]) / 6).reshape(1))


# -- training/sampler.py: behaviour a mutation audit found unpinned ------------------------------
def test_incremental_default_cap_counts_only_the_new_categories():
    """Adding one category: the per-order budget is that one category's order-1 total, split over the
    subsets that contain it (4 pairs with 'e' share 10 positives: 2 each), not the whole registry's."""
    s = make_sampler(max_order=2, per_subset=10, trainable=["e"])
    assert [(b.subsets, b.positives_per_subset) for b in s.budgets] == [(1, 10), (4, 2)]


def test_positives_of_a_combined_policy_come_from_each_of_its_categories():
    from collections import Counter

    s = make_sampler(max_order=3, per_subset=12)
    for order in (2, 3):
        for subset in s.subsets[order]:
            mine = Counter(i.category for i in s.epoch_items(0) if i.positive and tuple(i.policy) == subset)
            n = s.budgets[order - 1].positives_per_subset
            assert set(mine) == set(subset)  # every active category is taught, not only the first
            assert max(mine.values()) - min(mine.values()) <= 1 and sum(mine.values()) == n


def test_positives_left_over_by_a_subset_go_to_the_categories_least_served_at_its_order():
    from collections import Counter

    # order 3: 20 // 10 = 2 positives per 3-category subset; starting every subset at its first
    # member gave 'e' (last in every subset that holds it) no order-3 positive at all
    s = make_sampler(max_order=3, per_subset=4)
    assert s.budgets[2].positives_per_subset == 2
    counts = Counter(i.category for i in s.epoch_items(0) if i.positive and i.policy.order == 3)
    assert set(counts) == set(CATS) and max(counts.values()) - min(counts.values()) <= 2
    # where a subset's positives split evenly, every member in turn, as before
    even = make_sampler(max_order=3, per_subset=12)  # order 3: 6 per subset
    for subset in even.subsets[3]:
        cats = [i.category for i in even.epoch_items(0) if i.positive and tuple(i.policy) == subset]
        assert cats == [subset[j % 3] for j in range(6)]


def test_boundary_share_is_the_share_of_boundary_prompts_among_the_plain_negatives():
    s = make_sampler(max_order=1, per_subset=50, neg_ratio=2.0, inactive_share=0.0, boundary_share=0.25)
    plain = [i for i in s.epoch_items(0) if not i.positive]
    assert len(plain) == 500 and all(i.category == "neutral" for i in plain)
    share = sum(i.prompt.startswith("boundary") for i in plain) / len(plain)
    assert 0.18 < share < 0.32


def test_steps_per_epoch_counts_the_last_partial_batch_of_each_order():
    s = make_sampler(max_order=3, per_subset=6)
    for batch_size in (4, 7, 16):
        assert len(s.epoch_batches(0, batch_size)) == s.steps_per_epoch(batch_size)
    assert s.steps_per_epoch(7) == 3 * 9  # 60 items per order: 9 batches of up to 7


def test_hard_negative_pull_is_the_largest_active_rate_for_each_inactive_category():
    """Under {a, b}: c's pull is max(0.8, 0.2) and d's max(0.1, 0.3); with two confused categories
    the normalisation no longer hides which rate was taken."""
    s = make_sampler(max_order=2, per_subset=4, inactive_share=1.0, hard_negatives=1.0)
    confusion = {"a": {"c": 0.8, "d": 0.1}, "b": {"c": 0.2, "d": 0.3}}
    assert s.inactive_weights(("a", "b"), ["c", "d"], confusion) == pytest.approx([0.8 / 1.1, 0.3 / 1.1])


# --- behaviour a mutation audit found unpinned: checkpoint.py / schedule.py ---------------


def _mark_complete(ckpt, epoch):
    """A checkpoint directory whose completion marker is written the way training writes it."""
    from mosaic_safety.training.checkpoint import save_optimizer_state

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p])
    p.sum().backward()
    opt.step()
    save_optimizer_state(ckpt, opt, [("x", p)], epoch, epoch * 10)


def test_latest_checkpoint_is_the_highest_complete_epoch_by_number(tmp_path):
    """``epoch-10`` comes after ``epoch-9`` (numbers, not names), and a checkpoint whose marker a
    kill left missing or cut short is passed over for the one before."""
    from mosaic_safety.training.checkpoint import checkpoint_dir, latest_checkpoint

    assert latest_checkpoint(tmp_path) is None
    for epoch in (2, 9, 10):
        _mark_complete(checkpoint_dir(tmp_path, epoch), epoch)
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    checkpoint_dir(tmp_path, 11).mkdir()  # started, no marker yet
    (checkpoint_dir(tmp_path, 12)).mkdir()
    (checkpoint_dir(tmp_path, 12) / "trainer_state.json").write_text('{"epoch": 12, "st')  # cut short
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    (checkpoint_dir(tmp_path, 10) / "trainer_state.json").unlink()
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 9)


def test_a_resumed_log_keeps_the_step_its_checkpoint_was_written_at(tmp_path, tiny_backbone):
    """The resumed log has exactly the steps of an uninterrupted run: the lines up to the
    checkpoint's step are kept (that step is not trained again), only later ones are dropped."""
    from mosaic_safety.training.checkpoint import open_log
    from mosaic_safety.training.trainer import Trainer

    cfg = ("optim.epochs=2", "log.every=1")
    whole = tmp_path / "whole"
    Trainer(tiny_config(tmp_path, *cfg), backbone=tiny_backbone).train(whole)
    want = [json.loads(line)["step"] for line in (whole / "train_log.jsonl").read_text().splitlines()]

    run = tmp_path / "run"
    Trainer(tiny_config(tmp_path, *cfg), backbone=tiny_backbone).train(run)
    shutil.rmtree(run / "checkpoints" / "epoch-2")  # stopped during epoch 2, after logging all of it
    Trainer(tiny_config(tmp_path, *cfg), backbone=tiny_backbone).train(run, resume=True)
    got = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert got == want

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    open_log(tmp_path, resumed_step=3).close()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_resume_refuses_another_refusal_wording(tmp_path, tiny_backbone):
    """``data.refusal`` is the target every positive is trained on: a resumed run with another
    wording would train half a run on each, while the prompts (and so the data hash) are the same."""
    from mosaic_safety.tokens import ArtifactError
    from mosaic_safety.training.trainer import Trainer

    Trainer(tiny_config(tmp_path, "optim.epochs=1"), backbone=tiny_backbone).train(tmp_path / "run")
    other = Trainer(
        tiny_config(tmp_path, "optim.epochs=2", "data.refusal=Sorry, I can't help with {display}."),
        backbone=tiny_backbone,
    )
    with pytest.raises(ArtifactError, match=r"different config \(data.refusal"):
        other.train(tmp_path / "run", resume=True)


def test_decaying_schedules_hold_their_floor_past_the_last_step():
    """Cosine and linear decay end at ``FLOOR`` of the peak and stay there: a step past ``total``
    (the trainer never asks for one today) must not climb back up (cosine) or go negative (linear)."""
    from mosaic_safety.training.schedule import FLOOR, lr_at

    for schedule in ("cosine", "linear"):
        for step in (10, 11, 15, 40):
            assert lr_at(step, 11, 0.1, schedule) == pytest.approx(0.1 * FLOOR), (schedule, step)
        assert lr_at(25, 20, 0.1, schedule, warmup=4) == pytest.approx(0.1 * FLOOR)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("select", "mode", "best", "select.mode 'best'"),  # trained as 'last' without a word
        ("optim", "positive_credit", "mine", "optim.positive_credit 'mine'"),  # trained as 'all'
        ("optim", "autocast", "bf16", "optim.autocast"),  # trained in float32
        ("optim", "epochs", "2", r"optim.epochs: expected int, got '2'"),  # a TypeError in a check
        ("data", "categories", "alcohol,betting", "data.categories: expected a list of texts"),
        (None, "model", {"name": "tiny-random-llama"}, "model: expected a ModelConfig"),
        (None, "method", "lora_sft", "method_module"),  # trained control tokens, recorded as lora_sft
    ],
)
def test_trainer_checks_a_config_built_in_python(tmp_path, tiny_backbone, section, key, value, message):
    """A TrainConfig made or changed in Python never went through load_config's checks."""
    from mosaic_safety.config import ConfigError
    from mosaic_safety.training.trainer import Trainer

    config = tiny_config(tmp_path)
    setattr(getattr(config, section) if section else config, key, value)
    with pytest.raises(ConfigError, match=message):
        Trainer(config, backbone=tiny_backbone)
