"""Examples, loaders and suites: everything between data files and training/evaluation.

`external` (the packaged `harm` datasets) and `cli` are imported on demand, so importing this package
never touches third-party data packages.
"""

from .loaders import load_csv, load_file, load_hf, load_jsonl, near_duplicate_pairs, validate_examples
from .schema import SPLITS, DataError, Example
from .suites import Suite, list_suites, load_suite

__all__ = [
    "SPLITS",
    "DataError",
    "Example",
    "Suite",
    "list_suites",
    "load_csv",
    "load_file",
    "load_hf",
    "load_jsonl",
    "load_suite",
    "near_duplicate_pairs",
    "validate_examples",
]
