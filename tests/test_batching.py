"""The micro-batcher shares batches fairly: a small request waits for the batch being scored, not for the
chunks of large requests queued before it; large requests advance a chunk each in turn; and a batch of long
texts holds no more estimated tokens than the budget, so it is scored as quickly as one of short texts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from langops.onnx_model import Scores
from langops.serving.batching import MicroBatcher, estimated_tokens

pytestmark = pytest.mark.unit


class RecordingScorer:
    """Scores every text as one label, after ``seconds_per_call``; remembers the texts of each call in order."""

    max_length = 64

    def __init__(self, seconds_per_call: float = 0.05) -> None:
        self.seconds_per_call = seconds_per_call
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    def score(self, texts: Sequence[str], batch_size: int = 64) -> Scores:
        time.sleep(self.seconds_per_call)
        with self._lock:
            self.calls.append(list(texts))
        n = len(texts)
        return Scores(probs=np.full((n, 2), 0.5), embeddings=None, tokens=np.ones(n, dtype=np.int64),
                      unknown_share=np.zeros(n))


def run(coroutine):
    return asyncio.run(coroutine)


async def _with_batcher(body, **settings):
    batcher = MicroBatcher(**{"max_batch_size": 8, "max_batch_tokens": 1024, "max_wait_ms": 1.0, "max_queue": 1024,
                              **settings})
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.close()


def test_a_one_text_request_behind_four_large_ones_waits_for_one_batch_not_for_their_chunks():
    scorer = RecordingScorer()

    async def body(batcher):
        large = [asyncio.create_task(batcher.score(scorer, [f"large {r} text {i}" for i in range(40)]))
                 for r in range(4)]  # 4 requests x 5 chunks of 8 texts
        await asyncio.sleep(0.01)  # the first batch is being scored
        small = await batcher.score(scorer, ["where is my parcel"])
        calls_when_small_answered = len(scorer.calls)
        await asyncio.gather(*large)
        return small, calls_when_small_answered

    small, calls_when_answered = run(_with_batcher(body))
    assert small.probs.shape == (1, 2)
    # The batch being scored when it arrived, then its own: not the 20 chunks queued before it.
    assert calls_when_answered <= 2, scorer.calls[:3]
    assert len(scorer.calls) == 21


def test_large_requests_advance_a_chunk_each_in_turn():
    scorer = RecordingScorer(seconds_per_call=0.01)

    async def body(batcher):
        requests = [batcher.score(scorer, [f"request {r} text {i}" for i in range(24)]) for r in range(3)]
        return await asyncio.gather(*requests)

    results = run(_with_batcher(body))
    assert [len(result) for result in results] == [24, 24, 24]
    owners = [call[0].split(" text ")[0] for call in scorer.calls]
    assert owners[:3] == ["request 0", "request 1", "request 2"]  # round robin, not 0, 0, 0, 1, ...
    assert sorted(owners) == ["request 0"] * 3 + ["request 1"] * 3 + ["request 2"] * 3


def test_small_requests_still_share_one_batch_and_keep_their_rows_in_order():
    scorer = RecordingScorer(seconds_per_call=0.05)

    async def body(batcher):
        first = asyncio.create_task(batcher.score(scorer, ["warm up"]))
        await asyncio.sleep(0.01)
        together = [batcher.score(scorer, [f"a{i}", f"b{i}"]) for i in range(4)]  # 8 texts: one batch
        answers = await asyncio.gather(*together)
        await first
        return answers

    answers = run(_with_batcher(body))
    assert all(len(answer) == 2 for answer in answers)
    assert sorted(scorer.calls[1]) == sorted(f"{p}{i}" for i in range(4) for p in "ab")


def test_a_batch_of_long_texts_holds_no_more_tokens_than_the_budget():
    scorer = RecordingScorer(seconds_per_call=0.01)
    long_text = "my parcel never arrived and nobody answers " * 100  # far past max_length: costs 64
    short_texts = [f"refund {i}" for i in range(8)]  # 2 + 2 tokens each

    async def body(batcher):
        return await asyncio.gather(batcher.score(scorer, [long_text] * 20), batcher.score(scorer, short_texts))

    long_answer, short_answer = run(_with_batcher(body, max_batch_size=64, max_batch_tokens=256))
    assert (len(long_answer), len(short_answer)) == (20, 8)
    assert estimated_tokens(long_text, 64) == 64 and estimated_tokens("refund 1", 64) == 4
    costs = [sum(estimated_tokens(text, 64) for text in call) for call in scorer.calls]
    assert max(costs) <= 256, costs
    assert sorted(len([t for t in call if t == long_text]) for call in scorer.calls) == [0, 4, 4, 4, 4, 4]
    assert [t for call in scorer.calls for t in call if t != long_text] == short_texts  # one batch, in order


def test_a_text_over_the_token_budget_is_still_scored_alone():
    scorer = RecordingScorer(seconds_per_call=0.0)

    answer = run(_with_batcher(lambda batcher: batcher.score(scorer, ["x" * 1000, "y" * 1000]), max_batch_tokens=10))

    assert len(answer) == 2
    assert scorer.calls == [["x" * 1000], ["y" * 1000]]
