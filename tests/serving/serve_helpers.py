"""Constants and small helpers shared by the serving tests (keys, model id, request bodies)."""

from __future__ import annotations

KEYS = {
    "kids": "sk-kids-test",
    "teen": "sk-teen-test",
    "adult": "sk-adult-test",
    "venue": "sk-venue-test",
}
MODEL = "tiny"


def profiles_dict() -> dict:
    return {
        "registry": "minors",
        "default_profile": "adult",
        "profiles": {
            "kids": {"categories": ["addiction", "alcohol", "betting", "horror", "sex"]},
            "teen-eu": ["addiction", "alcohol", "betting", "sex"],
            "adult": {"categories": []},
        },
        "keys": [
            {"name": "kids-app", "key": KEYS["kids"], "profile": "kids"},
            {"name": "teen-app", "key": KEYS["teen"], "profile": "teen-eu"},
            {"name": "adult-app", "key": KEYS["adult"], "profile": "adult"},
            {"name": "venue", "key": KEYS["venue"], "profile": "adult", "floor": ["betting"]},
        ],
    }


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


def chat_body(text: str = "What is 17 times 23?", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 6, **extra}
