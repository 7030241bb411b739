"""Run the app under uvicorn in a background thread (tests, the load benchmark, notebooks).

Binds port 0 by default and reports the port the OS chose, so parallel test runs never collide.
Stopping it goes through uvicorn's own graceful shutdown: in-flight requests finish first. uvicorn
leaves signals alone outside the main thread, so the process keeps its own Ctrl-C handling.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class ServerThread:
    """``with ServerThread(app) as url: ...`` serves ``app`` on loopback until the block ends."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, graceful_s: float = 30.0):
        import uvicorn

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=graceful_s,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        return f"http://{self.host}:{sock.getsockname()[1]}"

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
