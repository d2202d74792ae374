"""Where a request's prompt is prepared: chat template, tokenizing, image preprocessing and the
images' digests. In threads of the server's process, or in a pool of worker processes.

Image decoding releases the interpreter lock; image preprocessing (the processor's resize and
array work) holds it, and tokenizing partly does. When many requests arrive together, e.g.
as a batch of streams finishes and their clients send the next turn, their preparation then
runs one after another under the server process's one lock, in front of the engine. Worker
processes prepare them side by side; the server process only sends each worker the messages
and the decoded images and gets back token ids and uint8 pixels.

A worker that dies breaks the pool: the request that saw it is prepared in a thread instead,
and a new pool replaces the broken one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from model.errors import InvalidRequest
from server.engine import ImageInput

log = logging.getLogger(__name__)


def encode(processor, messages: list[dict], images: list) -> tuple[list[int], list[ImageInput]]:
    """Chat template, token ids and preprocessed images (with their digests) of one request."""
    text = processor.apply_chat_template(messages)
    if processor.image_token in "".join(p.get("text", "") for m in messages
                                        if isinstance(m["content"], list) for p in m["content"]):
        raise InvalidRequest(f"text parts may not contain the reserved marker {processor.image_token}",
                             param="messages")
    ids = processor.tokenize(text, len(images))
    # uint8 where the processor allows (the engine normalizes them on its device): a quarter
    # of the bytes to hash here and to send to the engine process.
    pixels = processor.preprocess_images(images, normalize=False)
    inputs = [ImageInput(px, hashlib.sha256(px.numpy().tobytes()).hexdigest()[:32])
              for px in (pixels if pixels is not None else [])]
    return ids, inputs


def auto_workers(cpus: int | None = None) -> int:
    """Worker processes for ``--prepare-workers -1``: none below 8 CPUs (threads suffice, and
    each worker holds its own copy of torch and the processor: ~0.5 GB), else a quarter of the
    CPUs, at most 8."""
    cpus = cpus or os.cpu_count() or 1
    return 0 if cpus < 8 else min(8, cpus // 4)


_processor = None  # in a worker: its copy of the server's processor


def _start_worker(processor, started=None) -> None:
    from server.threads import name_os_thread

    global _processor
    _processor = processor
    name_os_thread("vlmamba-prep")
    torch.set_num_threads(1)  # one request at a time per worker; no idle intra-op threads spinning
    if started is not None:  # the first pool: every worker has started before the server takes requests
        started.wait(timeout=300)


def _ready() -> int:
    return os.getpid()


def _encode_in_worker(messages: list[dict], images: list) -> tuple[list[int], list[tuple]]:
    ids, inputs = encode(_processor, messages, images)
    return ids, [(i.pixel_values.numpy(), i.digest) for i in inputs]  # arrays pickle as plain bytes


class Preparer:
    """``await encode(messages, images)`` in a thread (``workers=0``) or in one of ``workers``
    processes, each with its own copy of ``processor``."""

    def __init__(self, processor, workers: int = 0):
        self.processor, self.workers = processor, workers
        self.pool: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Start the workers and wait until each has loaded the processor."""
        if self.workers > 0:
            # The pool starts a worker per task while none is idle: one task each, and a barrier
            # so that no worker takes a second task before all have started.
            self.pool = self._new_pool(mp.get_context("spawn").Barrier(self.workers))
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(self.pool, _ready) for _ in range(self.workers)))

    def _new_pool(self, started=None) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp.get_context("spawn"), initializer=_start_worker,
                                   initargs=(self.processor, started))

    def pids(self) -> list[int]:
        """The worker processes' ids (none without a pool)."""
        return list(self.pool._processes) if self.pool is not None and self.pool._processes else []

    async def encode(self, messages: list[dict], images: list) -> tuple[list[int], list[ImageInput]]:
        pool = self.pool
        if pool is None:
            return await asyncio.to_thread(encode, self.processor, messages, images)
        try:
            ids, raw = await asyncio.get_running_loop().run_in_executor(pool, _encode_in_worker, messages, images)
        except BrokenProcessPool:
            if self.pool is pool:  # the first request to see it replaces the pool
                log.warning("a prepare worker died; starting a new pool of %d", self.workers)
                self.pool = self._new_pool()
                pool.shutdown(wait=False, cancel_futures=True)
            return await asyncio.to_thread(encode, self.processor, messages, images)
        return ids, [ImageInput(torch.from_numpy(px), digest) for px, digest in raw]

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
