"""Registries, policies and recipes: every bad input is a clear error."""

from __future__ import annotations

import re

import pytest

from mosaic_safety.config import ConfigError, load_config
from mosaic_safety.policy import CategoryRegistry, Policy, PolicyError


def test_minors_registry(minors):
    assert minors.names == ("addiction", "alcohol", "betting", "horror", "sex")
    assert minors["alcohol"].refusal_text.endswith("about alcohol on this platform.")
    assert all(c.out_of_scope for c in minors)


def test_policy_canonical_order_and_dedup(minors):
    p = minors.policy("sex, alcohol,sex")
    assert p.categories == ("alcohol", "sex") and p.order == 2 and str(p) == "alcohol,sex"
    assert not minors.policy("") and minors.policy(None) == Policy(())


@pytest.mark.parametrize("name", ["Alcohol", "ALCOHOL", "alcoh\u043el", "drugs", "neutral"])
def test_unknown_or_confusable_names_are_rejected(minors, name):
    with pytest.raises(PolicyError, match="valid categories"):
        minors.policy([name])


def test_suggestion_for_typo(minors):
    with pytest.raises(PolicyError, match="did you mean 'alcohol'"):
        minors.policy("alchohol")


@pytest.mark.parametrize(
    "text, message",
    [
        ("categories: []", "defines no categories"),
        ("[1, 2]", "mapping with a 'categories' list"),
        ("categories:\n  - {name: a, display: A, description: d}", "missing refusal"),
        ("categories:\n  - {name: A, display: A, description: d, refusal: r}", "lower-case"),
        ("categories:\n  - {name: a, display: A, description: d, refusal: r, colour: red}", "unknown keys"),
        (
            "categories:\n  - {name: a, display: A, description: d, refusal: r}\n"
            "  - {name: a, display: A, description: d, refusal: r}",
            "defined twice",
        ),
        (  # one line, without PyYAML's excerpt and caret
            "categories: [\n",
            "not valid YAML: line 2, column 1: expected the node content, but found '<stream end>'$",
        ),
        (
            "categories:\n  - {name: a, display: A, description: d, refusal: 'No {displayy} here.'}",
            r"categories\[0\] \(a\) refusal has \{displayy\}: the only placeholder is \{display\}",
        ),
        ("categories:\n  - {name: a, display: A, description: d, refusal: 'No {} here.'}", r"has \{\}"),
        (
            "categories:\n  - {name: neutral, display: N, description: d, refusal: 'no {display}'}",
            "'neutral' is reserved",
        ),
        (
            "categories:\n  - {name: boundary, display: B, description: d, refusal: 'no {display}'}",
            "'boundary' is reserved",
        ),
    ],
)
def test_bad_registry_files(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        CategoryRegistry.load(path)


def test_registry_that_is_not_utf8_says_so(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"categories:\n  - {name: a, display: \xe9, description: d, refusal: r}\n")
    with pytest.raises(PolicyError, match=r"r.yaml: not UTF-8 text \(byte 35\)"):
        CategoryRegistry.load(path)


def test_hand_written_refusals_without_display_still_load(tmp_path):
    """Each category may word its own refusal; only a shared template must name ``{display}``."""
    path = tmp_path / "r.yaml"
    path.write_text("categories:\n  - {name: a, display: A, description: d, refusal: 'Not about A.'}\n")
    assert CategoryRegistry.load(path)["a"].refusal_text == "Not about A."


def test_registry_path_that_is_a_directory(tmp_path):
    with pytest.raises(PolicyError, match="cannot read the registry"):
        CategoryRegistry.load(tmp_path)


def test_overrides_given_as_one_text_are_refused():
    """A text iterates by character: "optim.lr=0.1" was read as the overrides 'o', 'p', ..."""
    with pytest.raises(ConfigError, match=r"pass \['optim.lr=0.1'\]"):
        load_config("configs/tiny-test.yaml", "optim.lr=0.1")


def test_missing_registry():
    with pytest.raises(PolicyError, match="not found"):
        CategoryRegistry.load("no-such-registry")


def test_one_refusal_wording_for_every_category(minors):
    sorry = minors.with_refusal("Sorry, I can't help with {display} here.")
    assert sorry.names == minors.names and sorry.name == minors.name
    assert sorry["betting"].refusal_text == "Sorry, I can't help with gambling and betting here."
    assert [c.description for c in sorry] == [c.description for c in minors]
    assert minors["betting"].refusal_text.startswith("I'm sorry, but")  # the suite's own is untouched
    for bad in ("Sorry, I can't help with that.", "{display}", "  {display} ", "No {display} on {site}."):
        with pytest.raises(PolicyError, match="must contain {display}"):
            minors.with_refusal(bad)


def test_config_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tokens:\n  m: 2\noptim:\n  epochs: 1\n")
    cfg = load_config(path, ["optim.lr=0.05", "data.categories=alcohol,sex", "log.tensorboard=true"])
    assert cfg.tokens.m == 2 and cfg.optim.lr == 0.05 and cfg.optim.epochs == 1
    assert cfg.data.categories == ["alcohol", "sex"] and cfg.log.tensorboard is True


def test_unreadable_config_files_are_one_line_errors(tmp_path):
    from mosaic_safety.config import ConfigError, load_config

    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00optim")
    for path, message in ((binary, "not a YAML text file"), (tmp_path, "cannot read the config")):
        with pytest.raises(ConfigError, match=message) as info:
            load_config(path)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("tokens:\n  mm: 2\n", [], "unknown config key"),
        ("optim:\n  epochs: two\n", [], "expected an integer"),
        ("tokens:\n  m: 0\n", [], "at least 1"),
        ("tokens:\n  placement: middle\n", [], "placement: prefix | system | user | user_end | assistant"),
        ("", ["optim.lr"], "key.sub=value"),
        ("", ["optim.lr=-1"], "positive"),
        ("", ["data.refusal=Sorry, not here."], "data.refusal must contain"),
        ('data:\n  refusal: " {display} "\n', [], "data.refusal must contain"),
        ("- a\n- b\n", [], "mapping of sections"),
        ("optim: [\n", [], "not valid YAML"),
        ("optim:\n\tlr: 0.05\n", [], "not valid YAML: line 2, column 1: found character '\\t'"),
        ("", ["data.refusal=no {display} \udce9"], "data.refusal: not valid UTF-8 text"),
        ("optim:\n  lr: 0.05\noptim:\n  epochs: 8\n", [], "line 3: 'optim' appears twice"),
        ("optim:\n  lr: 0.05\n  lr: 0.01\n", [], "line 3: 'lr' appears twice"),
        ("model:\n  name: 0755\n", [], "model.name: expected text, got 493; quote it"),
        ("data:\n  suite: off\n", [], "data.suite: expected text, got False"),
        ("model:\n  name:\n", [], "model.name must name a model"),
        ("", ["tokens.init=bogus"], "tokens.init 'bogus': choose description | text | vocab"),
        ("", ["teacher.batch_size=0"], "teacher.batch_size must be at least 1"),
        ("", ["eval.batch_size=0"], "eval.batch_size must be at least 1"),
        ("", ["log.every=0"], "log.every must be at least 1"),
        ("", ["data.limit_per_category=-3"], "data.limit_per_category must be >= 0"),
        ("", ["sampling.cap=-5"], "sampling.cap must be >= 0"),
        ("", ["optim.grad_clip=-1"], "optim.grad_clip must be >= 0"),
        ("", ["eval.split=bogus"], "eval.split 'bogus': choose train | val | test"),
        ("", ["eval.per_category=-1"], "eval.per_category must be >= 0"),
        ("", ["eval.max_new_tokens=-1"], "eval.max_new_tokens must be >= 0"),
        ("", ["optim.lr=.inf"], "optim.lr must be a finite number, got inf"),
        ("", ["sampling.neg_ratio=.nan"], "sampling.neg_ratio must be a finite number, got nan"),
        # past torch.manual_seed's range the run died on a traceback once the model had loaded
        ("", ["optim.seed=18446744073709551616"], "optim.seed must be from -9223372036854775808 to"),
        ("", ["optim.seed=-9223372036854775809"], "optim.seed must be from -9223372036854775808 to"),
        (
            "",
            ["optim.autocast=bfloat16", "method=lora_sft"],
            "method 'lora_sft' trains in the backbone's dtype",
        ),
        ("", ["optim.autocast=bfloat16", "method=dsa"], "method 'dsa' trains in the backbone's dtype"),
    ],
)
def test_bad_configs(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):  # messages are literal text
        load_config(path, overrides)


def test_seeds_at_the_ends_of_torchs_range_load():
    from mosaic_safety.config import load_config

    for seed in (-(2**63), -1, 2**64 - 1):
        assert load_config("configs/tiny-test.yaml", [f"optim.seed={seed}"]).optim.seed == seed


def test_yaml_anchors_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  <<: {lr: 0.05, epochs: 2}\n  epochs: 3\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 0.05 and cfg.optim.epochs == 3
    path.write_text("optim:\n  ? [lr]\n  : 1\n")
    with pytest.raises(ConfigError, match="a key must be a name"):
        load_config(path)


def test_text_settings_keep_what_was_typed(tmp_path):
    """On the command line a text setting is the text typed: YAML would cut a refusal at `#`, turn
    `Sorry: ...` into a mapping and 0755 into 493. Quotes still work; other settings stay YAML."""
    path = tmp_path / "c.yaml"
    path.write_text("init_artifact:\ndata:\n  refusal:\n")
    cfg = load_config(
        path,
        [
            "data.refusal=Sorry: no {display} here #1",
            "model.name=0755",
            "output='runs/quoted dir'",
            "method_options={alpha: 2}",
            "data.categories=[alcohol, sex]",
        ],
    )
    assert cfg.data.refusal == "Sorry: no {display} here #1" and cfg.model.name == "0755"
    assert cfg.output == "runs/quoted dir" and cfg.method_options == {"alpha": 2}
    assert cfg.data.categories == ["alcohol", "sex"] and cfg.init_artifact == ""  # empty, not "None"


def test_shipped_configs_load():
    from pathlib import Path

    configs = Path(__file__).parent.parent.joinpath("configs")
    recipes = [p for p in sorted(configs.glob("*.yaml")) if not p.name.startswith("profiles")]
    assert len(recipes) >= 8
    for path in recipes:
        load_config(path)


def test_a_stray_comma_is_an_error_not_fewer_categories(minors):
    """`--policy ,` ran with no policy and `data.categories=,` trained every category: a typo must
    never restrict less, or widen a run, without a word."""
    from mosaic_safety.config import ConfigError, load_config
    from mosaic_safety.policy import PolicyError

    for typo in (",", "alcohol,,betting", "alcohol,", " , "):
        with pytest.raises(PolicyError, match="empty category name"):
            minors.policy(typo)
        with pytest.raises(ConfigError, match="empty item"):
            load_config("configs/tiny-test.yaml", [f"data.categories={typo}"])
    assert not minors.policy("") and not minors.policy("  ")  # the empty policy, written out
    assert minors.policy(" alcohol , betting ").categories == ("alcohol", "betting")


def test_policy_built_from_a_text_is_refused_and_from_a_list_is_hashable(minors):
    """Policy("alcohol") was the 7-category policy a,l,c,o,h,o,l; Policy(["alcohol"]) was unhashable."""
    with pytest.raises(PolicyError, match=r"Policy\(\('alcohol',\)\)"):
        Policy("alcohol")
    listed = Policy(["alcohol"])
    assert listed == Policy(("alcohol",)) and hash(listed) == hash(Policy(("alcohol",)))


def test_package_lists_its_lazy_exports():
    """``dir(mosaic_safety)`` (what tab completion reads) listed none of the public names before use."""
    import mosaic_safety

    assert set(mosaic_safety.__all__) <= set(dir(mosaic_safety))
    # the errors a caller catches are public too
    assert {"BackboneError", "ConfigError", "GenerationError", "PlacementError"} <= set(mosaic_safety.__all__)
    for name in mosaic_safety.__all__:
        assert getattr(mosaic_safety, name) is not None
