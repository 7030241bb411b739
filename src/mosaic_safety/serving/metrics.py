"""Prometheus text-format metrics, kept in-process (no extra dependency for a handful of series).

Series: requests by endpoint and status, streams that ended in an error event, prompt/completion
tokens, request latency and batch size histograms, refusals by the category whose rule fired,
requests in flight.
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        suffix = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{suffix} {self.total:.6f}", f"{name}_count{suffix} {self.n}"]
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Thread-safe counters updated by request handlers and the batching worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.stream_errors: dict[tuple[str, int], int] = defaultdict(int)
        self.refusals: dict[str, int] = defaultdict(int)
        self.policies: dict[str, int] = defaultdict(int)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.in_flight = 0
        self.latency: dict[str, _Histogram] = {}
        self.batch = _Histogram(BATCH_BUCKETS)

    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if seconds is not None:
                self.latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def stream_error(self, endpoint: str, code: int) -> None:
        """A stream's status line said 200 before the failure: count the error event it ended with."""
        with self._lock:
            self.stream_errors[(endpoint, code)] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def refusal(self, category: str) -> None:
        with self._lock:
            self.refusals[category] += 1

    def policy(self, key: str) -> None:
        with self._lock:
            self.policies[key or "(none)"] += 1

    def batch_size(self, n: int) -> None:
        with self._lock:
            self.batch.observe(n)

    def flight(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP mosaic_requests_total HTTP requests by endpoint and status code.",
                "# TYPE mosaic_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'mosaic_requests_total{{endpoint="{_label(endpoint)}",status="{status}"}} {n}')
            lines += [
                "# HELP mosaic_stream_errors_total Streams (sent as status 200) that ended in an error event.",
                "# TYPE mosaic_stream_errors_total counter",
            ]
            for (endpoint, code), n in sorted(self.stream_errors.items()):
                lines.append(f'mosaic_stream_errors_total{{endpoint="{_label(endpoint)}",code="{code}"}} {n}')
            lines += [
                "# HELP mosaic_prompt_tokens_total Prompt positions processed (templated tokens + control vectors).",
                "# TYPE mosaic_prompt_tokens_total counter",
                f"mosaic_prompt_tokens_total {self.prompt_tokens}",
                "# HELP mosaic_completion_tokens_total Tokens generated.",
                "# TYPE mosaic_completion_tokens_total counter",
                f"mosaic_completion_tokens_total {self.completion_tokens}",
                "# HELP mosaic_refusals_total Refusals by the category whose rule fired (unknown: not attributable).",
                "# TYPE mosaic_refusals_total counter",
            ]
            for cat, n in sorted(self.refusals.items()):
                lines.append(f'mosaic_refusals_total{{category="{_label(cat)}"}} {n}')
            lines += [
                "# HELP mosaic_policy_requests_total Generation requests by applied policy.",
                "# TYPE mosaic_policy_requests_total counter",
            ]
            for key, n in sorted(self.policies.items()):
                lines.append(f'mosaic_policy_requests_total{{policy="{_label(key)}"}} {n}')
            lines += [
                "# HELP mosaic_request_latency_seconds Request latency (to the last byte) by endpoint.",
                "# TYPE mosaic_request_latency_seconds histogram",
            ]
            for endpoint, hist in sorted(self.latency.items()):
                lines += hist.lines("mosaic_request_latency_seconds", f'endpoint="{_label(endpoint)}"')
            lines += [
                "# HELP mosaic_batch_size Rows per decoding batch.",
                "# TYPE mosaic_batch_size histogram",
                *self.batch.lines("mosaic_batch_size"),
                "# HELP mosaic_requests_in_flight Generation requests admitted and not finished.",
                "# TYPE mosaic_requests_in_flight gauge",
                f"mosaic_requests_in_flight {self.in_flight}",
            ]
        return "\n".join(lines) + "\n"
