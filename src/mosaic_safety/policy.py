"""Safety categories and policies.

A *registry* is the list of categories a deployment knows about (loaded from YAML). A *policy* is
the set of categories active for one request. Policies always iterate in registry order, so the
same set of categories always composes into the same control-token prefix, whatever order a user
named them in.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NEUTRAL = "neutral"
"""Label of examples that belong to no category."""
BOUNDARY = "boundary"  # the evaluation's group of near-miss prompts that must be answered

BUILTIN_REGISTRIES = ("minors", "harm")


class PolicyError(ValueError):
    """A category name, registry file or policy string that cannot be used."""


@dataclass(frozen=True)
class Category:
    """One safety category: what it covers and how a refusal under it reads."""

    name: str
    display: str
    description: str
    refusal: str
    out_of_scope: str = ""

    @property
    def refusal_text(self) -> str:
        """The refusal template with the display name filled in."""
        return self.refusal.replace("{display}", self.display)

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "display": self.display,
            "description": self.description,
            "out_of_scope": self.out_of_scope,
            "refusal": self.refusal,
        }


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{where}: category name must be a non-empty string, got {name!r}")
    if name != name.strip().lower() or not all(c.isalnum() or c in "_-" for c in name):
        raise PolicyError(f"{where}: category name {name!r} must be lower-case letters, digits, '_' or '-'")
    if name in (NEUTRAL, BOUNDARY):
        raise PolicyError(
            f"{where}: {name!r} is reserved ({NEUTRAL!r} and {BOUNDARY!r} name the prompt groups outside "
            "every category)"
        )
    return name


REFUSAL_TEMPLATE_RULE = (
    "must contain {display}, no other {...} placeholder, and some text: each category's refusal names "
    "its rule, so serving and the judges can tell which one fired"
)


def usable_refusal_template(template: str) -> bool:
    """A shared refusal wording must still tell the categories apart (see ``REFUSAL_TEMPLATE_RULE``)."""
    return (
        "{display}" in template
        and bool(template.replace("{display}", "").strip())
        and not unknown_placeholders(template)
    )


def comma_list(text: str) -> list[str] | None:
    """``"a, b"`` as ``["a", "b"]`` and blanks as ``[]``; ``None`` for an empty item (``","``,
    ``"a,,b"``): a typo, which each caller reports in its own terms."""
    items = [n.strip() for n in text.split(",")] if text.strip() else []
    return None if "" in items else items


def unknown_placeholders(template: str) -> list[str]:
    """``{...}`` fields other than ``{display}`` (``{displayy}``, ``{Display}``, ``{}``)."""
    return [f"{{{m}}}" for m in re.findall(r"\{([^{}]*)\}", template) if m != "display"]


@dataclass(frozen=True)
class CategoryRegistry:
    """An ordered set of categories. The order is the canonical composition order."""

    name: str
    categories: tuple[Category, ...]
    description: str = ""
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, int] = {}
        for i, cat in enumerate(self.categories):
            _check_name(cat.name, f"registry {self.name!r}")
            if cat.name in index:
                raise PolicyError(f"registry {self.name!r}: category {cat.name!r} is defined twice")
            index[cat.name] = i
        if not index:
            raise PolicyError(f"registry {self.name!r} defines no categories")
        object.__setattr__(self, "_index", index)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> CategoryRegistry:
        if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
            raise PolicyError(f"{source}: a registry is a mapping with a 'categories' list")
        cats = []
        for i, raw in enumerate(data["categories"]):
            where = f"{source}: categories[{i}]"
            if not isinstance(raw, dict):
                raise PolicyError(f"{where} must be a mapping")
            missing = [k for k in ("name", "display", "description", "refusal") if not raw.get(k)]
            if missing:
                raise PolicyError(f"{where} is missing {', '.join(missing)}")
            unknown = set(raw) - {"name", "display", "description", "refusal", "out_of_scope"}
            if unknown:
                raise PolicyError(f"{where} has unknown keys {sorted(unknown)}")
            cats.append(
                Category(
                    name=_check_name(raw["name"], where),
                    display=str(raw["display"]),
                    description=" ".join(str(raw["description"]).split()),
                    refusal=str(raw["refusal"]),
                    out_of_scope=" ".join(str(raw.get("out_of_scope", "")).split()),
                )
            )
        return cls(
            name=str(data.get("name", source)),
            categories=tuple(cats),
            description=str(data.get("description", "")),
        )

    @classmethod
    def load(cls, spec: str | Path) -> CategoryRegistry:
        """Load a built-in registry by name (``minors``, ``harm``) or a YAML file by path.

        A bare built-in name always means the built-in registry; a local file of that name is
        ``./minors`` (or a ``Path``), so a stray file cannot swap the categories unnoticed.
        """
        path = Path(spec)
        if isinstance(spec, str) and spec in BUILTIN_REGISTRIES:
            path = Path(__file__).parent / "data" / "builtin" / spec / "registry.yaml"
        if not path.exists():
            raise PolicyError(
                f"registry {str(spec)!r} not found: give a YAML path or one of {', '.join(BUILTIN_REGISTRIES)}"
            )
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise PolicyError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except yaml.YAMLError as exc:
            from .config import yaml_problem

            raise PolicyError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
        except OSError as exc:  # a directory, no permission
            raise PolicyError(f"{path}: cannot read the registry: {exc.strerror or exc}") from None
        registry = cls.from_dict(data, source=str(path))
        for i, cat in enumerate(registry.categories):  # a file a person wrote: typos are caught here
            odd = unknown_placeholders(cat.refusal)
            if odd:
                raise PolicyError(
                    f"{path}: categories[{i}] ({cat.name}) refusal has {', '.join(odd)}: the only "
                    "placeholder is {display}, and any other would be trained and said literally"
                )
        return registry

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "categories": [c.to_dict() for c in self.categories],
        }

    def with_refusal(self, template: str) -> CategoryRegistry:
        """The same categories, every one refusing with ``template`` (which must name ``{display}``).

        A recipe-level choice of refusal wording: how often the base model already opens its
        answers the way the template does decides how selective trained tokens can be
        (docs/experiments.md, "A refusal the base model does not say"). ``{display}`` keeps each
        category's refusal distinct, so the rule that fired can still be read from the response.
        """
        if not usable_refusal_template(template):
            raise PolicyError(f"refusal template {template!r}: {REFUSAL_TEMPLATE_RULE}")
        cats = tuple(dataclasses.replace(c, refusal=template) for c in self.categories)
        return CategoryRegistry(self.name, cats, self.description)

    # -- lookup -------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    def __len__(self) -> int:
        return len(self.categories)

    def __iter__(self) -> Iterator[Category]:
        return iter(self.categories)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> Category:
        return self.categories[self.index(name)]

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise PolicyError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        msg = f"unknown category {name!r}; valid categories: {', '.join(self.names)}"
        close = difflib.get_close_matches(str(name).lower(), self.names, n=1)
        return msg + (f" (did you mean {close[0]!r}?)" if close else "")

    def policy(self, names: str | Iterable[str] | None) -> Policy:
        """Build a policy from names or a comma-separated string; unknown names are an error."""
        return Policy.parse(names, self)


@dataclass(frozen=True)
class Policy:
    """A set of active categories, kept in registry (canonical) order."""

    categories: tuple[str, ...]

    def __post_init__(self) -> None:
        # a text iterates by character: Policy("alcohol") was the 7-category policy "a,l,c,o,h,o,l"
        if isinstance(self.categories, str):
            raise PolicyError(
                f"Policy takes a tuple of category names, got the text {self.categories!r}: write "
                f"Policy(({self.categories!r},)), or registry.policy({self.categories!r}) to parse 'a,b'"
            )
        object.__setattr__(self, "categories", tuple(self.categories))  # a list would be unhashable

    @classmethod
    def parse(cls, names: str | Iterable[str] | None, registry: CategoryRegistry) -> Policy:
        if names is None:
            items: list[str] = []
        elif isinstance(names, str):
            items = comma_list(names)
            if items is None:  # read as fewer categories, it would restrict less than was asked
                raise PolicyError(
                    f"policy {names!r} has an empty category name: separate names with single commas "
                    "(the empty policy is written '')"
                )
        else:
            items = [str(n).strip() for n in names]
        for n in items:
            if n not in registry:  # exact match only: "Alcohol" or confusables are not "alcohol"
                raise PolicyError(registry.unknown_message(n))
        unique = set(items)
        return cls(tuple(n for n in registry.names if n in unique))

    @property
    def order(self) -> int:
        """Number of active categories (the paper's composition order r)."""
        return len(self.categories)

    def __bool__(self) -> bool:
        return bool(self.categories)

    def __iter__(self) -> Iterator[str]:
        return iter(self.categories)

    def __contains__(self, name: object) -> bool:
        return name in self.categories

    def __str__(self) -> str:
        return ",".join(self.categories) if self.categories else "(none)"

    @property
    def key(self) -> str:
        """A stable string key, e.g. for caches and reports; the empty policy is ``""``."""
        return ",".join(self.categories)
