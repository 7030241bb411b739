"""Fixtures: a real server (uvicorn on loopback, in a thread) over the tiny random model.

The artifact is the tiny backbone's randomly initialised control tokens: the outputs are gibberish,
but every code path (per-row control prefixes, batching, streaming, HTTP) is the real one.
"""

from __future__ import annotations

import pytest
import yaml
from serve_helpers import MODEL, profiles_dict


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_backbone, minors):
    from mosaic_safety.tokens import ControlTokens

    tokens = ControlTokens.initialise(
        minors, tiny_backbone.model.get_input_embeddings(), tiny_backbone.tokenizer, m=3
    )
    out = tmp_path_factory.mktemp("serve") / "art"
    tokens.save(out, tiny_backbone.describe())
    return out


@pytest.fixture(scope="session")
def profiles_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "profiles.yaml"
    path.write_text(yaml.safe_dump(profiles_dict(), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def make_server(tiny_artifact, tiny_backbone, profiles_path):
    """Build a Server over the tiny artifact with some settings overridden."""
    from mosaic_safety.serving.cli import build_server

    def make(profiles: bool = True, model_name: str = MODEL, **settings):
        return build_server(
            artifact=tiny_artifact,
            profiles=profiles_path if profiles else None,
            backbone=tiny_backbone,
            model_name=model_name,
            **settings,
        )

    return make


@pytest.fixture(scope="session")
def live(make_server):
    """One shared server with profiles and keys: (url, Server)."""
    from mosaic_safety.serving.app import create_app
    from mosaic_safety.serving.runner import ServerThread

    server = make_server(max_new_tokens=64, max_prompt_tokens=300, max_body_bytes=20_000, max_wait_ms=2)
    runner = ServerThread(create_app(server))
    url = runner.start()
    yield url, server
    runner.stop()


@pytest.fixture
def url(live):
    return live[0]
