"""Engine -> event loop delivery: one wake-up per batch, in order; lagging streams coalesce;
content chunks serialised from a prebuilt frame are the chunks of chunk_body, byte for byte."""

import asyncio
import threading

import pytest

from server.engine.types import EngineOutput
from server.protocol import chunk_body, content_chunk_sse, sse
from server.serving import Handoff, coalesce


def test_handoff_delivers_a_batch_in_order_with_one_wakeup():
    async def main():
        loop = asyncio.get_running_loop()
        handoff, qa, qb = Handoff(loop), asyncio.Queue(), asyncio.Queue()
        wakeups = []
        flush = handoff.flush
        handoff.flush = lambda: (wakeups.append(1), flush())

        def engine_step():  # one engine step's outputs, put from another thread
            for i in range(3):
                handoff.put(qa, EngineOutput("a", f"a{i}"))
                handoff.put(qb, EngineOutput("b", f"b{i}"))

        t = threading.Thread(target=engine_step)
        t.start()
        t.join()
        got_a = [(await qa.get()).text for _ in range(3)]
        got_b = [(await qb.get()).text for _ in range(3)]
        return got_a, got_b, len(wakeups)

    got_a, got_b, wakeups = asyncio.run(main())
    assert got_a == ["a0", "a1", "a2"] and got_b == ["b0", "b1", "b2"]
    assert wakeups == 1


def test_coalesce_joins_what_waits_and_keeps_the_ending():
    async def main():
        q = asyncio.Queue()
        for i in range(3):
            q.put_nowait(EngineOutput("r", f"t{i}", [i]))
        q.put_nowait(EngineOutput("r", "end", [9], finished=True, finish_reason="stop", completion_tokens=5))
        q.put_nowait(EngineOutput("r", "never"))  # nothing follows a finished output
        first = coalesce(await q.get(), q)
        return first, q.qsize()

    out, left = asyncio.run(main())
    assert out.text == "t0t1t2end" and out.token_ids == [0, 1, 2, 9]
    assert out.finished and out.finish_reason == "stop" and out.completion_tokens == 5
    assert left == 1


def test_coalesce_stops_at_an_error():
    q = asyncio.Queue()
    q.put_nowait(EngineOutput("r", "", finished=True, finish_reason="error", error="boom"))
    q.put_nowait(EngineOutput("r", "x"))
    out = coalesce(EngineOutput("r", "a"), q)
    assert out.error == "boom" and out.text == "a" and q.qsize() == 1


@pytest.mark.parametrize("model", ["shapes-demo", 'a "quoted" model\x00', "ünï/côdé"])
def test_content_chunks_are_byte_identical_to_chunk_body(model):
    content = content_chunk_sse("chatcmpl-abc", model, 1700000000)
    for text in ["a", " the", "\n", '"', "\\", "\x00", "é✓😀", "</script>", "\u2028", "data: [DONE]\n\n"]:
        assert content(text) == sse(chunk_body("chatcmpl-abc", model, 1700000000, {"content": text})), repr(text)
