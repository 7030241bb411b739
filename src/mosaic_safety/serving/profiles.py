"""Profiles and API keys: who may call the server, and the least policy each caller gets.

A profiles file (YAML) names policies (``kids``, ``teen-eu``, ``adult``) and maps API keys to a
profile. The key's profile plus its extra ``floor`` categories form a *floor*: every request made
with that key runs at least those categories. A request can add categories (through another
profile or explicit ``categories``) but has no way to subtract any: the applied policy is always
the union, so swapping to a laxer profile name changes nothing for a restricted key.

Category names must match the registry exactly. ``Alcohol``, ``alcohol `` or a Cyrillic ``а`` are
errors listing the valid names, never silently mapped: a policy engine that "helpfully" guesses is
one an attacker can steer.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError
from ..policy import CategoryRegistry, Policy
from . import ServeError

_PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class ApiKey:
    """One caller: a name for logs/metrics, the profile it defaults to and its policy floor."""

    name: str
    profile: str
    floor: tuple[str, ...]
    secret_sha256: str

    def matches(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).hexdigest()
        return hmac.compare_digest(digest, self.secret_sha256)


@dataclass(frozen=True)
class ResolvedPolicy:
    """What a request runs under, and why (reported back in the response)."""

    policy: Policy
    profile: str | None
    floor: tuple[str, ...]
    requested: tuple[str, ...]
    key: str | None

    def describe(self) -> dict[str, Any]:
        return {
            "categories": list(self.policy),
            "profile": self.profile,
            "floor": list(self.floor),
            "requested": list(self.requested),
            "key": self.key,
        }


@dataclass
class ProfileBook:
    """Named profiles and API keys over one category registry."""

    registry: CategoryRegistry
    profiles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    keys: list[ApiKey] = field(default_factory=list)
    default_profile: str | None = None

    @property
    def auth_required(self) -> bool:
        return bool(self.keys)

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def open(cls, registry: CategoryRegistry) -> ProfileBook:
        """No profiles file: no keys (anyone may call), no floor, an empty default policy."""
        return cls(registry=registry, profiles={"none": ()}, default_profile="none")

    @classmethod
    def load(cls, path: str | Path, registry: CategoryRegistry) -> ProfileBook:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"profiles file {path} not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        return cls.from_dict(data, registry, str(path))

    @classmethod
    def from_dict(cls, data: Any, registry: CategoryRegistry, source: str = "<profiles>") -> ProfileBook:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping with 'profiles' and 'keys'")
        unknown = set(data) - {"registry", "profiles", "keys", "default_profile"}
        if unknown:
            raise ConfigError(f"{source}: unknown keys {sorted(unknown)}")
        if data.get("registry") not in (None, registry.name):
            raise ConfigError(
                f"{source}: written for registry {data['registry']!r}, the model serves {registry.name!r}"
            )
        raw_profiles = data.get("profiles") or {}
        if not isinstance(raw_profiles, dict) or not raw_profiles:
            raise ConfigError(f"{source}: 'profiles' must be a non-empty mapping of name -> categories")
        profiles: dict[str, tuple[str, ...]] = {}
        for name, spec in raw_profiles.items():
            where = f"{source}: profile {name!r}"
            if not isinstance(name, str) or not _PROFILE_NAME.match(name):
                raise ConfigError(f"{where}: names are lower-case letters, digits, '_' or '-'")
            if isinstance(spec, dict) and set(spec) - {"categories", "description"}:
                raise ConfigError(
                    f"{where}: unknown fields {sorted(set(spec) - {'categories', 'description'})}"
                )
            cats = spec.get("categories") if isinstance(spec, dict) else spec
            profiles[name] = _config_categories(cats or [], registry, where, "its categories")
        default = data.get("default_profile")
        if default is not None and (not isinstance(default, str) or default not in profiles):
            raise ConfigError(f"{source}: default_profile {default!r} is not a profile")
        keys: list[ApiKey] = []
        for i, raw in enumerate(data.get("keys") or []):
            where = f"{source}: keys[{i}]"
            if not isinstance(raw, dict):
                raise ConfigError(f"{where} must be a mapping")
            extra = set(raw) - {"name", "key", "key_sha256", "profile", "floor"}
            if extra:
                raise ConfigError(f"{where}: unknown fields {sorted(extra)}")
            if ("key" in raw) == ("key_sha256" in raw):
                raise ConfigError(f"{where}: give exactly one of 'key' or 'key_sha256'")
            if "key" in raw and (not isinstance(raw["key"], str) or not raw["key"].strip()):
                # YAML reads an empty `key:` as null: it must not become the working key "None"
                raise ConfigError(
                    f"{where}: 'key' must be a non-empty string (quote it if it looks like a number)"
                )
            secret = raw.get("key_sha256") or hashlib.sha256(raw["key"].encode()).hexdigest()
            if not isinstance(secret, str) or not re.fullmatch(r"[0-9a-f]{64}", secret):
                raise ConfigError(f"{where}: key_sha256 must be 64 lower-case hex digits")
            profile = raw.get("profile") or default
            if not isinstance(profile, str) or profile not in profiles:
                raise ConfigError(f"{where}: profile {profile!r} is not one of {', '.join(profiles)}")
            extra_floor = _config_categories(raw.get("floor") or [], registry, where, "'floor'")
            floor = registry.policy([*profiles[profile], *extra_floor]).categories
            keys.append(ApiKey(str(raw.get("name") or f"key{i}"), profile, floor, str(secret)))
        secrets = [k.secret_sha256 for k in keys]
        if len(set(secrets)) != len(secrets):
            raise ConfigError(f"{source}: two keys share the same secret")
        return cls(registry=registry, profiles=profiles, keys=keys, default_profile=default)

    # -- per request --------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key from an ``Authorization: Bearer`` header; 401 when keys are configured."""
        if not self.auth_required:
            return None
        if not authorization:
            raise ServeError(
                401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error"
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ServeError(
                401, "malformed Authorization header: expected 'Bearer <key>'", "authentication_error"
            )
        found = None
        for key in self.keys:  # compare against all, so timing does not reveal which key was close
            if key.matches(token):
                found = key
        if found is None:
            raise ServeError(401, "invalid API key", "authentication_error")
        return found

    def resolve(
        self,
        key: ApiKey | None,
        profile: str | None = None,
        categories: Sequence[Any] | None = None,
    ) -> ResolvedPolicy:
        """The applied policy: key floor ∪ chosen profile ∪ explicit categories (never fewer)."""
        if profile is not None and profile not in self.profiles:
            raise ServeError(
                400,
                f"unknown profile {profile!r}; valid profiles: {', '.join(self.profiles)}",
                param="profile",
            )
        chosen = profile or (key.profile if key else self.default_profile)
        requested = request_categories(categories or [], self.registry)
        floor = key.floor if key else ()
        base = self.profiles.get(chosen, ()) if chosen else ()
        policy = self.registry.policy([*floor, *base, *requested])
        return ResolvedPolicy(policy, chosen, floor, requested, key.name if key else None)

    def describe(self) -> dict[str, Any]:
        return {
            "registry": self.registry.name,
            "categories": [
                {"name": c.name, "display": c.display, "refusal": c.refusal_text} for c in self.registry
            ],
            "profiles": {name: list(cats) for name, cats in self.profiles.items()},
            "default_profile": self.default_profile,
            "auth_required": self.auth_required,
        }


def request_categories(
    names: Iterable[Any], registry: CategoryRegistry, field: str = "safety.categories"
) -> tuple[str, ...]:
    """Exact category names from a request; anything else is a 400 listing the valid names."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ServeError(400, f"{field} must be a list of category names", param="safety.categories")
    out = []
    for name in names:
        if not isinstance(name, str) or name not in registry:  # exact: no strip, no case folding
            raise ServeError(
                400,
                registry.unknown_message(name)  # with a "did you mean" for " alcohol" or "Alcohol"
                + (
                    " (names in a list are exact: no spaces)"
                    if isinstance(name, str) and name.strip() != name
                    else ""
                ),
                param="safety.categories",
            )
        out.append(name)
    return registry.policy(out).categories


def _config_categories(names: Any, registry: CategoryRegistry, where: str, field: str) -> tuple[str, ...]:
    try:
        return request_categories(names, registry, field=field)
    except ServeError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
