"""Dynamic micro-batching over ``ControlledModel``: concurrent requests share a batch, one policy per row.

A single worker thread owns the model. It takes the first waiting job, then keeps collecting jobs
until the batch is full (``max_batch_size``) or ``max_wait_ms`` has passed, encodes them together
(every row its own control-token prefix, left padding, positions from the attention mask) and
decodes step by step with the KV cache. Each step's token goes straight back to its request's
asyncio queue, so streaming responses see tokens as they are produced.

Greedy rows decode exactly like ``ControlledModel.decode_steps`` (same forward calls, ``argmax``),
so a request's greedy output does not depend on what it was batched with. Rows differ in their
budget (``max_new_tokens``), ``min_tokens``, temperature, top-p and seed; a finished or cancelled
row is fed the pad token until the whole batch ends.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..controlled import ControlledModel, Prompt, extend_cache, pick_token, prefill_logits
from ..policy import Policy
from .metrics import Metrics

log = logging.getLogger("mosaic.serve")


@dataclass(frozen=True)
class Sampling:
    """Per-request decoding options. ``temperature == 0`` is greedy (the server's default)."""

    max_new_tokens: int = 64
    min_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Job:
    """One row of a future batch, and the channel its tokens go back through."""

    prompt: Prompt
    policy: Policy
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
            self.cancelled.set()


def _ended_if_gone(job: Job) -> bool:
    """Whether the row's client has left; if so its handler gets its "done" here (one look, so a
    row is either ended or kept, never both)."""
    if job.cancelled.is_set():
        job.emit("done", "cancelled")
        return True
    return False


class Engine:
    """The batching worker. ``submit`` from the event loop; tokens arrive as ``("token", id)``
    events, then ``("done", finish_reason)`` or ``("error", message)``."""

    def __init__(
        self,
        model: ControlledModel,
        max_batch_size: int = 8,
        max_wait_ms: float = 10.0,
        metrics: Metrics | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics or Metrics()
        self.lock = threading.Lock()  # the prompt-split cache is shared with request handlers
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="mosaic-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued, then stop the worker."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        if self._stop.is_set():
            raise RuntimeError("the engine is shutting down")
        self._jobs.put(job)

    # -- helpers for request handlers ---------------------------------------------------------
    def prompt_tokens(self, prompt: Prompt, policy: Policy) -> int:
        """Positions the prompt occupies (templated text + control vectors)."""
        with self.lock:
            head, tail = self.model.split_prompt(prompt)
            return len(head) + len(tail) + self.model.block_length(policy)

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- worker -------------------------------------------------------------------------------
    def _collect(self) -> list[Job]:
        """The next batch: up to ``max_batch_size`` live rows, waiting ``max_wait`` after the first.

        A row whose client left while it queued ends here with its "done" and takes no place, so
        gone clients never leave a batch short while live rows wait behind it.
        """
        jobs: list[Job] = []
        deadline: float | None = None
        while len(jobs) < self.max_batch_size:
            try:
                if deadline is None:
                    job = self._jobs.get(timeout=0.05)
                else:
                    remaining = deadline - time.monotonic()
                    job = self._jobs.get(timeout=remaining) if remaining > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            if _ended_if_gone(job):
                continue
            jobs.append(job)
            if deadline is None:
                deadline = time.monotonic() + self.max_wait
        return [job for job in jobs if not _ended_if_gone(job)]  # and those that left as the batch filled

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            jobs = self._collect()
            if not jobs:
                if self._stop.is_set() and self._jobs.empty():
                    return
                continue
            try:
                self._decode(jobs)
            except Exception as exc:  # never kill the worker: fail the batch, keep serving
                log.exception("batch of %d failed", len(jobs))
                for job in jobs:
                    job.emit("error", f"generation failed: {type(exc).__name__}: {exc}")

    def _decode(self, jobs: list[Job]) -> None:
        model = self.model
        with self.lock:
            batch = model.encode([j.prompt for j in jobs], [j.policy for j in jobs])
        self.batches += 1
        self.metrics.batch_size(len(jobs))
        device = model.device
        eos = torch.tensor(model.eos_ids, device=device)
        pad = model.tokenizer.pad_token_id
        budgets = [j.sampling.max_new_tokens for j in jobs]
        generators = [
            _generator(device, j.sampling.seed) if j.sampling.temperature > 0 else None for j in jobs
        ]
        mask, position = batch.attention_mask, batch.position_ids[:, -1:]
        out = prefill_logits(model.model, batch)
        done = [False] * len(jobs)
        for step in range(max(budgets)):
            logits = out.logits[:, -1].float()
            greedy = logits.argmax(-1).tolist()  # one call for the common case
            tokens = []
            for i, job in enumerate(jobs):
                if done[i]:
                    tokens.append(pad)
                    continue
                s = job.sampling
                if s.temperature <= 0 and step >= s.min_tokens:
                    tok = greedy[i]
                else:
                    # shift so the max is 0: a tiny temperature then gives -inf, never inf - inf = nan
                    row = logits[i : i + 1] - logits[i : i + 1].max()
                    if step < s.min_tokens:
                        row[:, eos] = float("-inf")
                    tok = int(
                        pick_token(row, s.temperature > 0, s.temperature or 1.0, s.top_p, generators[i])[0]
                    )
                tokens.append(tok)
                if job.cancelled.is_set():
                    done[i] = True
                    job.emit("done", "cancelled")
                elif tok in model.eos_ids:
                    done[i] = True
                    job.emit("done", "stop")
                else:
                    job.emit("token", tok)
                    if step + 1 >= budgets[i]:
                        done[i] = True
                        job.emit("done", "length")
            if all(done):
                return
            token = torch.tensor(tokens, device=device)
            token = torch.where(torch.isin(token, eos), torch.full_like(token, pad), token)
            out, mask, position = extend_cache(model.model, token, mask, position, out.past_key_values)


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A request's sampling generator: its seed reproduces a sample; without one each request
    samples afresh (as OpenAI's API does), not every unseeded request alike."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
