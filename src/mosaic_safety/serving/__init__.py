"""Serving per-request safety policies over an OpenAI-compatible HTTP API.

One frozen model serves many audiences: every request carries its policy (a named profile, explicit
categories, and the floor of the API key it came with), and concurrent requests with different
policies share one batch, one policy per row.

Modules: ``profiles`` (YAML profiles and API keys, policy resolution), ``engine`` (dynamic
micro-batching over ``ControlledModel``), ``app`` (the FastAPI application), ``metrics``
(Prometheus text), ``refusal`` (which category's rule fired), ``vllm_backend`` (scale-out on vLLM
through ``prompt_embeds``), ``cli`` (the ``mosaic serve`` command).
"""

from __future__ import annotations

__all__ = ["ServeError"]


class ServeError(Exception):
    """A request the server answers with an HTTP error (status, OpenAI-style type, one-line message)."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        }
