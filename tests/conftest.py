"""Shared fixtures: a tiny random Llama backbone (session-wide, built in well under a second)."""

from __future__ import annotations

import os
import signal

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A shell without job control starts `cmd &` with SIGINT ignored, and an ignored signal stays ignored
# across exec: the CLI processes the Ctrl-C tests start would never see their SIGINT. Python's own
# handler here is not inherited, so they start with the default and install theirs.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_backbone():
    from mosaic_safety.tiny import build_backbone

    return build_backbone()


@pytest.fixture(scope="session")
def minors():
    from mosaic_safety.policy import CategoryRegistry

    return CategoryRegistry.load("minors")


@pytest.fixture
def tiny_tokens(tiny_backbone, minors):
    from mosaic_safety.tokens import ControlTokens

    return ControlTokens.initialise(
        minors, tiny_backbone.model.get_input_embeddings(), tiny_backbone.tokenizer, m=3
    )


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own cache directory (teacher answers, converted models stay out of ~)."""
    if "MOSAIC_TEST_SHARED_CACHE" not in os.environ:
        monkeypatch.setenv("MOSAIC_CACHE", str(tmp_path / "cache"))
