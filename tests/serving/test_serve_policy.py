"""Profiles, keys and floors: a request can add categories but never get below its key's floor."""

from __future__ import annotations

import httpx
import pytest
from serve_helpers import KEYS, MODEL, auth, chat_body, profiles_dict

from mosaic_safety.config import ConfigError
from mosaic_safety.serving.profiles import ProfileBook
from mosaic_safety.serving.refusal import UNKNOWN, RefusalAttributor

ALL = ["addiction", "alcohol", "betting", "horror", "sex"]


def _post(url, body, who="kids", headers=None):
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers or auth(who))


@pytest.mark.parametrize(
    "body",
    [
        chat_body(model=f"{MODEL}:adult"),  # a laxer profile through the model name
        chat_body(safety={"profile": "adult"}),  # ... or through the safety field
        chat_body(safety={"categories": []}),  # an empty explicit list
        chat_body(safety={"categories": ["alcohol"]}),  # a subset of the floor
        chat_body(model=f"{MODEL}:teen-eu", safety={"profile": "teen-eu", "categories": ["sex"]}),
    ],
)
def test_kids_floor_cannot_be_dropped(url, body):
    r = _post(url, body, "kids")
    assert r.status_code == 200, r.text
    assert r.json()["safety"]["categories"] == ALL
    assert r.json()["safety"]["floor"] == ALL


def test_key_floor_adds_to_profile_and_requests_add_more(url):
    got = _post(url, chat_body(), "venue").json()["safety"]
    assert got["categories"] == ["betting"] and got["profile"] == "adult" and got["key"] == "venue"
    got = _post(url, chat_body(model=f"{MODEL}:teen-eu"), "venue").json()["safety"]
    assert got["categories"] == ["addiction", "alcohol", "betting", "sex"]
    got = _post(url, chat_body(safety={"categories": ["horror"]}), "adult").json()["safety"]
    assert got["categories"] == ["horror"] and got["floor"] == []


def test_swapping_keys_swaps_floors(url):
    """The policy follows the key presented, not anything else in the request."""
    body = chat_body(safety={"profile": "adult"})
    assert _post(url, body, "adult").json()["safety"]["categories"] == []
    assert _post(url, body, "kids").json()["safety"]["categories"] == ALL
    assert _post(url, body, "venue").json()["safety"]["categories"] == ["betting"]


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        f"Basic {KEYS['kids']}",
        f"Bearer {KEYS['kids'].upper()}",
        f"Bearer {KEYS['kids']}x",
        f"Bearer {KEYS['kids'][:-1]}",
        "Bearer sk-unknown",
    ],
)
def test_missing_or_unknown_key_is_401(url, header):
    headers = {} if header is None else {"Authorization": header}
    r = _post(url, chat_body(), headers=headers or {"X-Nothing": "1"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    "name",
    [
        "Alcohol",
        "ALCOHOL",
        " alcohol",
        "alcohol ",
        "\u0430lcohol",  # Cyrillic a
        "alcoh\u03bfl",  # Greek omicron
        "alcohol\u200b",  # zero-width space
        "ａｌｃｏｈｏｌ",  # full-width
        "alcohols",
        "neutral",
        "",
    ],
)
def test_confusable_or_differently_cased_categories_are_400(url, name):
    r = _post(url, chat_body(safety={"categories": [name]}), "adult")
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "valid categories: addiction, alcohol, betting, horror, sex" in message
    assert r.json()["error"]["param"] == "safety.categories"
    if name in ("Alcohol", " alcohol", "alcohol "):  # the CLI accepts the spaced ones: say why not here
        assert "(did you mean 'alcohol'?)" in message
        assert ("no spaces" in message) == (name != "Alcohol")


@pytest.mark.parametrize("bad", ["alcohol", {"x": 1}, [1], [None]])
def test_categories_must_be_a_list_of_names(url, bad):
    assert _post(url, chat_body(safety={"categories": bad}), "adult").status_code == 400


def test_unknown_or_conflicting_profile_is_400(url):
    r = _post(url, chat_body(model=f"{MODEL}:Kids"), "adult")
    assert r.status_code == 400 and "valid profiles: kids, teen-eu, adult" in r.json()["error"]["message"]
    r = _post(url, chat_body(model=f"{MODEL}:kids", safety={"profile": "adult"}), "adult")
    assert r.status_code == 400 and "conflicting profiles" in r.json()["error"]["message"]
    r = _post(url, chat_body(model=f"{MODEL}:"), "adult")
    assert r.status_code == 400
    r = _post(url, chat_body(safety={"profile": "kids", "drop": ["alcohol"]}), "kids")
    assert r.status_code == 400  # unknown safety fields are errors, not ignored


def test_profiles_file_errors_are_clear(minors):
    good = profiles_dict()
    book = ProfileBook.from_dict(good, minors)
    assert book.auth_required and [k.name for k in book.keys] == [
        "kids-app",
        "teen-app",
        "adult-app",
        "venue",
    ]
    cases = [
        ({**good, "profiles": {"kids": ["Alcohol"]}}, "unknown category 'Alcohol'"),
        ({**good, "registry": "harm"}, "written for registry 'harm'"),
        ({**good, "keys": [{"key": "a", "profile": "nope"}]}, "profile 'nope'"),
        ({**good, "keys": [{"key": "a", "key_sha256": "0" * 64}]}, "exactly one of"),
        ({**good, "keys": [{"key": "a"}, {"key": "a"}]}, "share the same secret"),
        ({**good, "keys": [{"key": "a", "floor": ["casino"]}]}, "unknown category 'casino'"),
        ({**good, "extra": 1}, "unknown keys"),
        ({**good, "default_profile": "x"}, "default_profile"),
        ({**good, "default_profile": ["kids"]}, "default_profile"),
        ({**good, "keys": [{"key": "a", "profile": ["kids"]}]}, r"profile \['kids'\] is not one of"),
        ({**good, "keys": [{"key": None}]}, "'key' must be a non-empty string"),  # YAML's empty `key:`
        ({**good, "keys": [{"key": ""}]}, "'key' must be a non-empty string"),
        ({**good, "keys": [{"key": 1234}]}, "quote it"),
        ({**good, "keys": [{"key_sha256": 5}]}, "key_sha256 must be 64"),
        ({**good, "profiles": {"kids": ","}}, "profile 'kids': its categories must be a list"),
        ({**good, "keys": [{"key": "a", "floor": 5}]}, r"keys\[0\]: 'floor' must be a list"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            ProfileBook.from_dict(data, minors)


@pytest.mark.parametrize("wording", ["", "Sorry, I can't help with {display} on this platform."])
def test_refusal_attribution(minors, wording):
    """Rules are read from the artifact's templates: the suite's own, or a recipe's data.refusal."""
    registry = minors.with_refusal(wording) if wording else minors
    att = RefusalAttributor(registry)
    alcohol, betting = registry["alcohol"].refusal_text, registry["betting"].refusal_text
    assert att.attribute(alcohol, ["alcohol", "betting"]) == "alcohol"
    assert att.attribute(betting + " Ask me anything else!", ["alcohol", "betting"]) == "betting"
    assert att.attribute(alcohol.replace("'", "\u2019").upper(), ["alcohol"]) == "alcohol"
    # cut by max_tokens after the templates diverge: still attributable
    assert att.attribute(betting[: len(betting) - 8], ["alcohol", "betting"]) == "betting"
    # cut before they diverge: a refusal, but not attributable to one rule
    common = next(i for i, (a, b) in enumerate(zip(alcohol, betting)) if a != b)
    assert att.attribute(alcohol[:common], ["alcohol", "betting"]) == UNKNOWN
    # another category's template or a free-form refusal: unknown; an answer: None
    assert att.attribute(alcohol, ["betting"]) == UNKNOWN
    assert att.attribute("I'm sorry, I can't do that.", ["horror"]) == UNKNOWN
    assert att.attribute("Sure! Lisbon is lovely in May.", ALL) is None
    assert att.attribute("", ALL) is None


def test_shipped_example_profiles_load(minors):
    """The example in configs/ is what users copy: it must parse and name only real categories."""
    from pathlib import Path

    from mosaic_safety.serving.profiles import ProfileBook

    path = Path(__file__).resolve().parents[2] / "configs" / "profiles.example.yaml"
    book = ProfileBook.load(path, minors)
    assert {"kids", "teen-eu", "adult"} <= set(book.profiles)


# --- behaviour a mutation audit found unpinned: profiles.py -------------------------------


def test_a_key_without_a_profile_takes_the_default_profile(minors):
    """A key that names no profile runs under ``default_profile``, not under whichever profile the
    file happens to list first (here ``kids``): the floor must be the one the operator chose."""
    data = {**profiles_dict(), "keys": [{"name": "plain", "key": "sk-plain"}]}
    book = ProfileBook.from_dict(data, minors)
    (key,) = book.keys
    assert key.profile == "adult" and key.floor == ()
    data = {**data, "default_profile": "teen-eu"}
    (key,) = ProfileBook.from_dict(data, minors).keys
    assert key.profile == "teen-eu" and key.floor == ("addiction", "alcohol", "betting", "sex")


def test_the_bearer_scheme_is_case_insensitive(url):
    """HTTP auth schemes are case-insensitive (RFC 7235): ``bearer <key>`` authenticates the key."""
    for scheme in ("bearer", "BEARER"):
        r = _post(url, chat_body(), headers={"Authorization": f"{scheme} {KEYS['kids']}"})
        assert r.status_code == 200, r.text
        assert r.json()["safety"]["key"] == "kids-app" and r.json()["safety"]["floor"] == ALL
