"""The service front's own work: adaptive batching (``service._RowBatcher``: rows of concurrent requests
cross to the model process together, each request gets back exactly its own answers, failures reach every
request of the batch) and where a request is decoded (small ones on the event loop, large images never)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from types import SimpleNamespace

import pytest
from PIL import Image

from mmops.serving import service
from mmops.serving.service import _declared_pixels, _few_pixels, _RowBatcher


class _Model:
    """A model process stand-in: answers each row with its own value, recording the batches it saw."""

    def __init__(self, delay: float = 0.01, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.delay, self.fail, self.concurrent, self.most_concurrent = delay, fail, 0, 0

    async def __call__(self, rows: list[int]) -> list[int]:
        self.batches.append(list(rows))
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            await asyncio.sleep(self.delay)
            if self.fail:
                raise RuntimeError("forward pass failed")
            return [row * 10 for row in rows]
        finally:
            self.concurrent -= 1


def test_concurrent_requests_are_batched_and_each_gets_its_own_answers():
    model = _Model()

    batcher = _RowBatcher(model, max_rows=8, max_inflight=1)

    async def main() -> list[list[int]]:
        requests = [[i] for i in range(20)] + [[100, 101, 102]]
        return await asyncio.gather(*(batcher(rows) for rows in requests))

    answers = asyncio.run(main())
    assert answers[:20] == [[i * 10] for i in range(20)]
    assert answers[20] == [1000, 1010, 1020]
    assert len(model.batches) < 21  # batched: far fewer crossings than requests
    assert (batcher.batches, batcher.rows) == (len(model.batches), 23)  # what /model reports
    assert all(len(batch) <= 8 for batch in model.batches)
    assert sorted(row for batch in model.batches for row in batch) == [*range(20), 100, 101, 102]


def test_a_lone_request_goes_at_once_and_a_large_one_alone():
    model = _Model()

    async def main() -> tuple[list[int], list[int]]:
        batcher = _RowBatcher(model, max_rows=4, max_inflight=2)
        alone = await asyncio.wait_for(batcher([7]), timeout=1)  # no timer to wait for
        large = await batcher(list(range(10)))  # over max_rows: sent whole, never split or stuck
        return alone, large

    alone, large = asyncio.run(main())
    assert alone == [70] and large == [i * 10 for i in range(10)]
    assert model.batches == [[7], list(range(10))]


def test_batches_in_flight_are_bounded():
    model = _Model(delay=0.02)

    async def main() -> None:
        batcher = _RowBatcher(model, max_rows=2, max_inflight=2)
        await asyncio.gather(*(batcher([i]) for i in range(12)))

    asyncio.run(main())
    assert model.most_concurrent == 2


def test_a_failed_batch_fails_each_of_its_requests_and_the_next_batch_still_runs():
    model = _Model(fail=True)

    async def main() -> list[object]:
        batcher = _RowBatcher(model, max_rows=8, max_inflight=1)
        failed = await asyncio.gather(*(batcher([i]) for i in range(3)), return_exceptions=True)
        model.fail = False
        return [*failed, await batcher([5])]

    *failed, after = asyncio.run(main())
    assert all(isinstance(f, RuntimeError) for f in failed)
    assert after == [50]


def test_a_request_whose_client_left_does_not_break_its_batch():
    model = _Model(delay=0.05)

    async def main() -> list[int]:
        batcher = _RowBatcher(model, max_rows=8, max_inflight=1)
        first = asyncio.ensure_future(batcher([1]))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(batcher([2]))
        kept = asyncio.ensure_future(batcher([3]))
        await asyncio.sleep(0.01)
        gone.cancel()
        await first
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await kept

    assert asyncio.run(main()) == [30]


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 10, 10)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def test_only_images_that_declare_few_pixels_count_as_cheap_to_decode():
    small, large = _png(64), _png(2048)
    assert len(large) < service.INLINE_DECODE_BYTES  # a small body can hold a large image
    assert _declared_pixels(small) == 64 * 64 and _declared_pixels(base64.b64encode(small).decode()) == 64 * 64
    assert _few_pixels([small]) and _few_pixels([base64.b64encode(small).decode()]) and _few_pixels([])
    assert not _few_pixels([large]) and not _few_pixels([base64.b64encode(large).decode()])
    for junk in (b"not an image", "not base64 !", None):
        assert _declared_pixels(junk) is None and not _few_pixels([small, junk])
    many = service.INLINE_DECODE_PIXELS // (64 * 64) + 1  # many small images cost as much as a large one
    assert _few_pixels([small] * (many - 1)) and not _few_pixels([small] * many)
    part = io.BytesIO(small)
    part.seek(10)
    assert _few_pixels([part]) and part.tell() == 0  # an uploaded part is left at its start for the decoder


def _where_decoded(images: list[object], body: int) -> str:
    host = SimpleNamespace(_decode_limiter=None)
    decode = service.MultimodalService.inner._decoding

    async def main() -> str:
        service._body_bytes.set(body)
        loop_thread = threading.get_ident()
        return (await decode(host, images, lambda: [threading.get_ident() == loop_thread]))[0]

    return "loop" if asyncio.run(main()) else "thread"


def test_a_small_request_decodes_on_the_event_loop_and_a_large_image_in_a_thread():
    assert _where_decoded([_png(64)], body=1_000) == "loop"
    assert _where_decoded([_png(2048)], body=20_000) == "thread"  # 91 ms measured: never on the loop
    assert _where_decoded([_png(64)], body=service.INLINE_DECODE_BYTES + 1) == "thread"
    assert _where_decoded([], body=500) == "loop"
