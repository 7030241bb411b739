"""``mosaic serve``: load a method (normally a MOSAIC artifact) and serve it over HTTP.

Heavy imports (torch, transformers, fastapi, uvicorn) happen inside the command, so ``mosaic
--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer


def serve_command(
    artifact: Path | None = typer.Option(
        None, "--artifact", "-a", help="Artifact directory (mosaic or another method)."
    ),
    profiles: Path | None = typer.Option(
        None, "--profiles", help="YAML profiles and API keys (none: no auth, empty default policy)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free one)."),
    method: str | None = typer.Option(None, "--method", help="Without --artifact: none | in_context."),
    model: str | None = typer.Option(None, "--model", help="Backbone (default: the artifact's)."),
    model_name: str | None = typer.Option(
        None, "--model-name", help="Model id clients send (default mosaic-<backbone>)."
    ),
    max_batch_size: int = typer.Option(8, "--max-batch-size", min=1, help="Requests decoded together."),
    max_wait_ms: float = typer.Option(
        10.0, "--max-wait-ms", min=0.0, help="How long a request waits for others to batch with."
    ),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Cap on a request's max_tokens."),
    default_max_tokens: int = typer.Option(
        128, "--default-max-tokens", min=1, help="max_tokens of a request that gives none."
    ),
    max_prompt_tokens: int = typer.Option(
        2048,
        "--max-prompt-tokens",
        min=1,
        help="Longest templated prompt with its control tokens (above: 400).",
    ),
    max_body_bytes: int = typer.Option(
        1_000_000, "--max-body-bytes", min=1024, help="Largest request body (above: 413)."
    ),
    request_timeout: float = typer.Option(120.0, "--request-timeout", min=0.1, help="Seconds per request."),
    max_concurrency: int = typer.Option(64, "--max-concurrency", min=1, help="Beyond this: 429."),
    graceful_timeout: float = typer.Option(
        60.0, "--graceful-timeout", help="Seconds to finish in-flight work."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N | auto"),
    dtype: str = typer.Option("auto", "--dtype", help="float32 | bfloat16 | auto"),
) -> None:
    """Serve per-request safety policies over an OpenAI-compatible API (+ /metrics, /playground)."""
    from ..cli import console, friendly_errors

    with friendly_errors():
        check_listen(host, port)  # before the model loads: a taken port or a typo'd host costs seconds
        server = build_server(
            artifact=artifact,
            profiles=profiles,
            method=method,
            model=model,
            model_name=model_name,
            device=device,
            dtype=dtype,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
            max_new_tokens=max_new_tokens,
            default_max_tokens=min(default_max_tokens, max_new_tokens),
            max_prompt_tokens=max_prompt_tokens,
            max_body_bytes=max_body_bytes,
            request_timeout_s=request_timeout,
            max_concurrency=max_concurrency,
        )
    import uvicorn

    from .app import create_app

    book = server.book
    console.print(
        f"[cyan]•[/] serving {server.settings.model_id} ({server.method.name}) on http://{host}:{port}  "
        f"profiles: {', '.join(book.profiles)}  keys: {len(book.keys) or 'none (open server)'}  "
        f"playground: http://{host}:{port}/playground",
        highlight=False,
    )
    if not book.auth_required:
        console.print("[yellow]warning:[/] no --profiles: any caller may choose any policy", highlight=False)
    uvicorn.run(
        create_app(server), host=host, port=port, log_level="info", timeout_graceful_shutdown=graceful_timeout
    )


def check_listen(host: str, port: int) -> None:
    """Fail with one line when the server could not listen there (uvicorn would exit 3 with its own
    log line, after the model load)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise OSError(f"--host {host!r}: not an address or a known host name ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def build_server(
    artifact: Path | None = None,
    profiles: Path | None = None,
    method: str | None = None,
    model: str | None = None,
    model_name: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    backbone: object | None = None,
    **settings: object,
):
    """Load the method and profiles and build the ``Server`` (shared by the CLI, tests and the benchmark)."""
    from ..config import ConfigError
    from ..methods import MethodError, load_method
    from .app import Server, ServeSettings
    from .profiles import ProfileBook

    if artifact is None and method is None:
        raise MethodError("give --artifact DIR (or --method none|in_context with --model)")
    if profiles is not None and not Path(profiles).is_file():
        # Checked before the model loads: a typo should not cost a model load to find out.
        raise ConfigError(f"profiles file {profiles} not found")
    loaded = load_method(
        method, artifact=artifact, backbone=backbone, model=model, device=device, dtype=dtype
    )
    backbone_name = loaded.backbone.name if hasattr(loaded, "backbone") else "model"
    book = ProfileBook.load(profiles, loaded.registry) if profiles else None
    cfg = ServeSettings(model_id=model_name or f"mosaic-{backbone_name}", **settings)  # type: ignore[arg-type]
    return Server(loaded, book, cfg)
