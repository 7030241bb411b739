"""The moving average of the control tokens (``optim.ema``): the rule, the swap, training and resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mosaic_safety.config import ConfigError, load_config
from mosaic_safety.tokens import ArtifactError, ControlTokens
from mosaic_safety.training.weight_average import WeightAverage, ema_decay


def tiny_config(tmp_path, *overrides):
    return load_config("configs/tiny-test.yaml", [f"output={tmp_path / 'run'}", *overrides])


def test_decay_warms_up_then_holds():
    assert ema_decay(0.99, 0) == pytest.approx(0.1)  # the first update takes 90% of the live tensor
    assert ema_decay(0.99, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.99, 10_000) == 0.99


def test_update_is_the_moving_average_and_applied_swaps_back_bitwise():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    avg = WeightAverage([("a", p)], 0.5)
    expected = torch.zeros(2, 3)
    for n, value in enumerate([1.0, 2.0, 4.0]):
        with torch.no_grad():
            p.fill_(value)
        avg.update()
        d = ema_decay(0.5, n)
        expected = d * expected + (1 - d) * value
    assert torch.allclose(avg.shadow["a"], expected)
    live = p.detach().clone()
    with avg.applied() as held:
        assert torch.equal(p.detach(), avg.shadow["a"])
        assert torch.equal(held["a"], live)
    assert torch.equal(p.detach(), live)


def test_applied_restores_the_live_tensors_after_an_error():
    p = torch.nn.Parameter(torch.ones(3))
    avg = WeightAverage([("a", p)], 0.9)
    with torch.no_grad():
        p.fill_(5.0)
    with pytest.raises(RuntimeError), avg.applied():
        raise RuntimeError("validation failed")
    assert torch.equal(p.detach(), torch.full((3,), 5.0))


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_the_open_interval_is_refused(decay):
    with pytest.raises(ValueError, match="EMA decay"):
        WeightAverage([("a", torch.nn.Parameter(torch.zeros(1)))], decay)


def test_restore_names_what_is_missing():
    avg = WeightAverage([("a", torch.nn.Parameter(torch.zeros(1)))], 0.9)
    with pytest.raises(KeyError, match="a"):
        avg.restore({}, 3)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.ema=1", r"optim.ema must be in \[0, 1\)"),
        ("optim.ema=-0.1", r"optim.ema must be in \[0, 1\)"),
        ("optim.ema=0.9 method=lora_sft", "does not support it"),
    ],
)
def test_bad_ema_settings_are_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *override.split())


def test_the_artifact_is_the_average_of_an_unchanged_training_path(tmp_path, tiny_backbone):
    """The average changes what ships, not what the optimiser does: the live tensors a checkpoint
    keeps are those of the same run without it, and the artifact differs from them."""
    from mosaic_safety.training.trainer import Trainer

    plain = Trainer(tiny_config(tmp_path, "optim.lr=0.2"), backbone=tiny_backbone)
    plain.train(tmp_path / "plain")
    averaged = Trainer(tiny_config(tmp_path, "optim.lr=0.2", "optim.ema=0.8"), backbone=tiny_backbone)
    averaged.train(tmp_path / "ema")
    live = load_file(str(tmp_path / "ema" / "checkpoints" / "epoch-2" / "optimizer.safetensors"))
    shipped = ControlTokens.load(tmp_path / "ema", tiny_backbone.describe())
    last = ControlTokens.load(tmp_path / "ema" / "checkpoints" / "epoch-2", tiny_backbone.describe())
    for name in plain.tokens.categories:
        assert torch.allclose(live[f"{name}.live"], plain.tokens.blocks[name], atol=1e-6), name
        assert torch.equal(shipped.blocks[name], averaged.average.shadow[name]), name
        assert torch.equal(shipped.blocks[name], last.blocks[name]), name  # the checkpoint holds it too
        assert not torch.allclose(shipped.blocks[name], plain.tokens.blocks[name], atol=1e-4), name


def test_resume_continues_both_the_live_tensors_and_their_average(tmp_path, tiny_backbone):
    from mosaic_safety.training.trainer import Trainer

    recipe = ("optim.lr=0.2", "optim.ema=0.8", "tokens.deep=true")
    full = Trainer(tiny_config(tmp_path, *recipe), backbone=tiny_backbone)
    full.train(tmp_path / "full")
    Trainer(tiny_config(tmp_path, *recipe, "optim.epochs=1"), backbone=tiny_backbone).train(tmp_path / "run")
    resumed = Trainer(tiny_config(tmp_path, *recipe), backbone=tiny_backbone)
    resumed.train(tmp_path / "run", resume=True)
    assert resumed.average.updates == full.average.updates
    for key, tensor in full.average.shadow.items():
        assert torch.allclose(tensor, resumed.average.shadow[key], atol=1e-5), key
    final = "checkpoints/epoch-2/optimizer.safetensors"
    a, b = load_file(str(tmp_path / "full" / final)), load_file(str(tmp_path / "run" / final))
    assert {k for k in a if k.endswith(".live")} == {k for k in b if k.endswith(".live")} != set()
    for key in a:
        if key.endswith(".live"):
            assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_resuming_a_run_trained_without_the_average_says_so(tmp_path, tiny_backbone):
    from mosaic_safety.training.trainer import Trainer

    Trainer(tiny_config(tmp_path, "optim.epochs=1"), backbone=tiny_backbone).train(tmp_path / "run")
    other = Trainer(tiny_config(tmp_path, "optim.ema=0.8"), backbone=tiny_backbone)
    with pytest.raises(ArtifactError, match="different config"):
        other.train(tmp_path / "run", resume=True)


def test_a_checkpoint_without_its_live_tensors_is_a_clear_error(tmp_path, tiny_backbone):
    from safetensors.torch import save_file

    from mosaic_safety.training.trainer import Trainer

    recipe = ("optim.ema=0.8", "optim.epochs=1")
    Trainer(tiny_config(tmp_path, *recipe), backbone=tiny_backbone).train(tmp_path / "run")
    path = tmp_path / "run" / "checkpoints" / "epoch-1" / "optimizer.safetensors"
    state = load_file(str(path))
    save_file({k: v for k, v in state.items() if not k.endswith(".live")}, str(path))
    resumed = Trainer(tiny_config(tmp_path, "optim.ema=0.8"), backbone=tiny_backbone)
    with pytest.raises(ArtifactError, match="lacks the live tensors of alcohol"):
        resumed.train(tmp_path / "run", resume=True)


def test_incremental_training_averages_only_the_new_categories(tmp_path, tiny_backbone):
    from mosaic_safety.training.trainer import Trainer

    first = tiny_config(tmp_path, "data.categories=alcohol,betting", "optim.epochs=1")
    Trainer(first, backbone=tiny_backbone).train(tmp_path / "first")
    old = ControlTokens.load(tmp_path / "first")
    second = Trainer(
        tiny_config(
            tmp_path,
            "data.categories=horror",
            "optim.epochs=1",
            "optim.ema=0.8",
            f"init_artifact={tmp_path / 'first'}",
        ),
        backbone=tiny_backbone,
    )
    second.train(tmp_path / "second")
    assert [name for name, _ in second.average.named] == ["horror"]
    new = ControlTokens.load(tmp_path / "second", tiny_backbone.describe())
    for name in ("alcohol", "betting"):
        assert torch.equal(new.blocks[name], old.blocks[name])
