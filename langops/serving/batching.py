"""Dynamic micro-batching: concurrent requests share one onnxruntime call.

Requests put their texts on a bounded queue and await a future. One collector coroutine takes the
oldest request, lets others join it until the batch holds ``max_batch_size`` texts or the oldest has
waited ``max_wait_ms``, and hands the batch to a single inference thread, which tokenises (padding to
the longest text of each call) and scores it. Texts of very different lengths are scored in separate
calls (see ``_score``) so short ones are not padded to a long one. While that thread works, the next
batch gathers in the queue, so under load batches fill without waiting at all.

A request is never split across batches except into chunks of at most ``max_batch_size`` texts (how
the MLflow pyfunc scores too, 64 at a time) and at most ``max_batch_tokens`` estimated tokens, so a
request within both alone in its batch gets exactly the pyfunc's numbers. The token budget keeps one
batch short whatever its texts: 64 texts cut at the model's ``max_length`` cost as much as several
hundred short ones, and a small request waits for the batch being scored. Tokens are estimated from
characters (``estimated_tokens``), not counted: counting would tokenise each text twice.

Batches are filled fairly, not first come first served: the requests waiting are served least-scored
first (the texts of theirs already taken into batches; then those with the fewest texts left, then the
oldest), at most one chunk of each per batch. A one-text request that arrives behind four requests of 200
long texts each therefore waits for the batch being scored, not for the dozens of chunks queued before it,
and each large request still advances by a chunk in turn.

Riding with others can move a request's probabilities slightly when the int8 graph was quantised
dynamically (``compress.quantization: dynamic``): its activation scales are computed over the whole batch.
A statically quantised graph (the default) gives a text the same answer in any batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from langops.onnx_model import Scores

logger = logging.getLogger(__name__)

PADDING_WASTE = 1.5  # most padded characters per real character in one onnxruntime call
CHARS_PER_TOKEN = 4  # English WordPiece averages 4 to 5; fewer per token (CJK) only makes batches larger


def estimated_tokens(text: str, max_length: int) -> int:
    """The tokens ``text`` costs in a batch, from its length: the model's truncation caps it; two are special."""
    return min(max_length, len(text) // CHARS_PER_TOKEN + 2)


class Scorer(Protocol):
    """What the batcher scores with: the live model's classifier."""

    max_length: int  # tokens per text after truncation

    def score(self, texts: Sequence[str], batch_size: int = 64) -> Scores: ...


class Overloaded(RuntimeError):
    """Too many texts are already waiting: the request is shed rather than queued without bound."""


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no new work."""


@dataclass
class _Request:
    """One caller's texts, as chunks still to batch; ``taken`` counts its texts already in batches."""

    chunks: deque[_Job]
    arrived: float = field(default_factory=time.monotonic)
    taken: int = 0

    def remaining(self) -> int:
        return sum(len(job.texts) for job in self.chunks)


@dataclass
class _Job:
    scorer: Scorer
    texts: list[str]
    tokens: int  # estimated
    future: asyncio.Future[Scores]


class MicroBatcher:
    """Groups concurrent scoring requests into batches for one inference thread.

    ``on_batch(size)`` is called for each batch formed and ``on_queue(depth)`` whenever the number of
    waiting texts changes (both from the event loop), so metrics stay outside this class.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: Callable[[int], None] = lambda size: None,
        on_queue: Callable[[int], None] = lambda depth: None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._requests: list[_Request] = []  # those with chunks still to batch
        self._queued_texts = 0
        self._wakeup: asyncio.Event | None = None
        self._collector: asyncio.Task[None] | None = None
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="langops-inference")

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    def start(self) -> None:
        """Start the collector on the running event loop."""
        self._wakeup = asyncio.Event()
        self._collector = asyncio.get_running_loop().create_task(self._collect(), name="langops-batcher")

    async def close(self) -> None:
        """Refuse new work, score everything already queued, then stop the inference thread."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._collector is not None:
            await self._collector
        self._executor.shutdown(wait=True)

    async def score(self, scorer: Scorer, texts: Sequence[str]) -> Scores:
        """Probabilities, embeddings and token counts for ``texts`` (rows in input order), scored in shared batches.

        Raises:
            ShuttingDown: the server is stopping.
            Overloaded: accepting the texts would put more than ``max_queue`` in the queue.
        """
        if self._closing or self._wakeup is None:
            raise ShuttingDown("the server is shutting down and takes no new requests")
        texts = list(texts)
        if self._queued_texts + len(texts) > self.max_queue:
            raise Overloaded(
                f"server is overloaded: {self._queued_texts} texts are waiting and this request adds "
                f"{len(texts)} (queue limit {self.max_queue}); retry later"
            )
        loop = asyncio.get_running_loop()
        chunks = deque(_Job(scorer, chunk, tokens, loop.create_future())
                       for chunk, tokens in self._chunks(texts, scorer.max_length))
        futures = [job.future for job in chunks]
        if chunks:
            self._requests.append(_Request(chunks))
        self._queued_texts += len(texts)
        self._on_queue(self._queued_texts)
        self._wakeup.set()
        parts = await asyncio.gather(*futures)
        return Scores.concat(parts)

    def _chunks(self, texts: list[str], max_length: int) -> list[tuple[list[str], int]]:
        """``texts`` cut in order into chunks of at most ``max_batch_size`` texts and ``max_batch_tokens``
        estimated tokens (a text over the budget alone is a chunk), with each chunk's tokens."""
        chunks: list[tuple[list[str], int]] = []
        chunk: list[str] = []
        tokens = 0
        for text in texts:
            cost = estimated_tokens(text, max_length)
            if chunk and (len(chunk) == self.max_batch_size or tokens + cost > self.max_batch_tokens):
                chunks.append((chunk, tokens))
                chunk, tokens = [], 0
            chunk.append(text)
            tokens += cost
        if chunk:
            chunks.append((chunk, tokens))
        return chunks

    async def _collect(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._requests:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for company only until the oldest request has waited max_wait: under load the queue
            # filled while the previous batch ran, and the deadline has long passed.
            deadline = min(request.arrived for request in self._requests) + self.max_wait_s
            while self._queued_texts < self.max_batch_size and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take_batch()
            size = sum(len(job.texts) for job in batch)
            self._queued_texts -= size
            self._on_queue(self._queued_texts)
            try:
                results, call_sizes = await loop.run_in_executor(self._executor, _score, batch)
            except Exception as exc:  # the failure belongs to this batch's requests only
                logger.exception("inference failed for a batch of %d texts", size)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for call_size in call_sizes:
                self._on_batch(call_size)
            for job, scores in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(scores)

    def _take_batch(self) -> list[_Job]:
        """The next chunk of each waiting request, least-served first (then fewest texts left, then oldest),
        while they fit in one batch (texts and tokens) and share the first one's model (a swap splits
        batches)."""
        waiting = sorted(self._requests, key=lambda request: (request.taken, request.remaining(), request.arrived))
        first = waiting[0].chunks[0]
        batch, size, tokens = [], 0, 0
        for request in waiting:
            job = request.chunks[0]
            fits = size + len(job.texts) <= self.max_batch_size and tokens + job.tokens <= self.max_batch_tokens
            if job.scorer is not first.scorer or (batch and not fits):
                continue
            batch.append(request.chunks.popleft())
            request.taken += len(job.texts)
            size += len(job.texts)
            tokens += job.tokens
            if size >= self.max_batch_size or tokens >= self.max_batch_tokens:
                break
        self._requests = [request for request in self._requests if request.chunks]
        return batch


def _score(batch: list[_Job]) -> tuple[list[Scores], list[int]]:
    """Runs on the inference thread: scores per job, and the size of each onnxruntime call.

    A batch is padded to its longest text, so one long sentence among short ones multiplies the work.
    Jobs are therefore sorted by length and cut into runs whose padded size stays within
    ``PADDING_WASTE`` times their real size; each run is one tokenisation and one onnxruntime call.
    A job is never split, so a request alone is scored exactly as the pyfunc scores it.
    """
    lengths = [max(len(text) for text in job.texts) for job in batch]
    order = sorted(range(len(batch)), key=lengths.__getitem__)
    runs: list[list[int]] = [[]]
    texts_in_run = chars_in_run = 0
    for index in order:
        job = batch[index]
        padded = lengths[index] * (texts_in_run + len(job.texts))  # sorted: this job's length is the longest
        real = chars_in_run + sum(len(text) for text in job.texts)
        if runs[-1] and padded > PADDING_WASTE * real:
            runs.append([])
            texts_in_run = chars_in_run = 0
        runs[-1].append(index)
        texts_in_run += len(job.texts)
        chars_in_run += sum(len(text) for text in job.texts)
    results: list[Any] = [None] * len(batch)
    for run in runs:
        texts = [text for index in run for text in batch[index].texts]
        scores = batch[run[0]].scorer.score(texts, batch_size=len(texts))
        start = 0
        for index in run:
            end = start + len(batch[index].texts)
            results[index] = scores.rows(start, end)
            start = end
    return results, [sum(len(batch[index].texts) for index in run) for run in runs]
