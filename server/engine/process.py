"""The engine in a process of its own: :class:`EngineProcess` stands in for :class:`Engine`.

In one process, the asyncio loop that turns engine outputs into SSE chunks and the engine loop
take turns on one interpreter lock, and at many concurrent streams the HTTP side slows the
engine down. Here a child process (``spawn``: it inherits no CUDA or thread state) loads the
model, builds the normal :class:`Engine` and runs it; the server process keeps only the
processor (tokenizing and image preprocessing), which the child sends once it is ready.

One duplex pipe carries pickled tuples:

- server -> child: ``("add", request fields...)``, ``("abort", request_id)``, ``("stop",)``;
- child -> server: ``("ready", processor, model name, device)`` or ``("failed", message)`` once,
  then one ``("burst", outputs, observations, stats)`` per engine iteration (or per several,
  when the server reads slower than the engine runs): every output of the iteration, the
  :class:`Observer` calls made (replayed into the server's metrics) and the engine's counters.

Each side's pipe ends are read by one thread and written by one other thread. The child exits
when the server says stop, when its pipe closes, or when the server process is gone.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from server.engine.engine import Engine, EngineConfig, Observer
from server.engine.types import EngineOutput, EngineRequest, EngineStats, ImageInput
from server.heap import freeze_startup_heap
from server.threads import name_os_thread

log = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """The engine process failed before it was ready (the message carries the child's exception)."""


def _pack(out: EngineOutput):
    """Most outputs are one token of a running request: send those as a short tuple."""
    return (out.request_id, out.text, out.token_ids) if not out.finished else out


def _unpack(packed) -> EngineOutput:
    return packed if isinstance(packed, EngineOutput) else EngineOutput(*packed)


def _send(conn, msg) -> None:
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


# ---- the server side ---------------------------------------------------------------------------
class EngineProcess:
    """The server's handle on an engine running in a child process; the same calls as :class:`Engine`.

    ``loader()`` runs in the child and returns ``(model, processor, model_name)``; it must be
    picklable (a module-level function or a ``functools.partial`` of one). ``observer`` receives
    the engine's observations, replayed from the child.
    """

    def __init__(self, loader: Callable, config: EngineConfig | None = None, observer: Observer | None = None):
        self.loader, self.config = loader, config or EngineConfig()
        self.observer = observer or Observer()
        self.processor = self.model_name = self.device = None
        self.process: mp.Process | None = None
        self._conn = None
        self._stats = EngineStats(slots_total=self.config.max_num_seqs)
        self._pending: dict[str, tuple] = {}  # request_id -> (sink, arrival, prompt_tokens), until finished
        self._lock = threading.Lock()
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = self._stopping = self._dead = False
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the child and block until its engine is ready (model loaded, graphs captured)."""
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_child_main, name="vlmamba-engine", daemon=True,
                                   args=(child_conn, self.loader, self.config, _logging_setup()))
        self.process.start()
        child_conn.close()  # only the child holds its end now: its exit reads as EOF here
        try:
            msg = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self.process.join(timeout=5)
            raise EngineStartError(f"the engine process exited (code {self.process.exitcode}) before it was ready")
        if msg[0] == "failed":
            self.process.join(timeout=10)
            raise EngineStartError(f"the engine process failed to start: {msg[1]}")
        _, self.processor, self.model_name, self.device = msg
        self._ready = True
        self._threads = [threading.Thread(target=self._read, name="vlmamba-engine-reader", daemon=True),
                         threading.Thread(target=self._write, name="vlmamba-engine-writer", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("engine process %d ready: %s on %s", self.process.pid, self.model_name, self.device)

    def shutdown(self) -> None:
        """Stop the child (running requests fail with "server shutting down") and reap it."""
        if self.process is None or self._stopping:
            return
        self._stopping = True
        self._outgoing.put(("stop",))
        self._outgoing.put(None)
        self.process.join(timeout=15)
        if self.process.is_alive():
            log.warning("engine process %d did not stop in time; killing it", self.process.pid)
            self.process.kill()
            self.process.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        self._conn.close()

    @property
    def alive(self) -> bool:
        return self._ready and not self._dead and self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # ---- requests (from the event loop) ------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> None:
        if not self.alive:  # raced with the child's exit: fail it rather than leave it waiting
            req.sink(EngineOutput(req.request_id, finished=True, finish_reason="error",
                                  error="the engine is not running", prompt_tokens=len(req.prompt_ids)))
            return
        with self._lock:
            self._pending[req.request_id] = (req.sink, req.arrival, len(req.prompt_ids))
        images = [(im.pixel_values.numpy(), im.digest) for im in req.images]
        self._outgoing.put(("add", req.request_id, req.prompt_ids, images, req.params, req.scope, req.session_id,
                            req.arrival))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)  # nothing more is delivered to it
        self._outgoing.put(("abort", request_id))

    def num_waiting(self) -> int:
        # Requests sent but not yet seen running by the child count as waiting, as in Engine.
        s = self._stats
        return max(s.waiting, len(self._pending) - s.running)

    def num_running(self) -> int:
        return self._stats.running

    def slots_used(self) -> int:
        return self._stats.slots_used

    def stats(self) -> EngineStats:
        return replace(self._stats, waiting=self.num_waiting())

    # ---- the pipe ----------------------------------------------------------------------------------
    def _write(self) -> None:
        """Pickle and send in this thread: a large image must never block the event loop on the pipe."""
        name_os_thread()
        while (msg := self._outgoing.get()) is not None:
            try:
                _send(self._conn, msg)
            except OSError:
                return  # the child is gone; the reader reports it

    def _read(self) -> None:
        name_os_thread()
        while True:
            try:
                msg = pickle.loads(self._conn.recv_bytes())  # blocks without the GIL
            except (EOFError, OSError):
                break
            self._deliver(*msg[1:])
        self._exited()

    def _deliver(self, outputs: list, observations: list, stats: EngineStats) -> None:
        """One message: observations first (a client that got its answer sees it counted), then outputs."""
        self._stats = stats
        for name, *args in observations:
            getattr(self.observer, name)(*args)
        outs = [_unpack(p) for p in outputs]
        with self._lock:  # once per message; the sinks run outside it
            pending = [self._pending.pop(o.request_id, None) if o.finished else self._pending.get(o.request_id)
                       for o in outs]
        for out, p in zip(outs, pending):
            if p is not None:  # else aborted: nobody listens any more
                p[0](out)

    def _exited(self) -> None:
        """The child's pipe closed: fail what is still in flight; an unexpected exit is logged."""
        self._dead = True
        if not self._stopping:  # else shutdown() reaps it: one thread waits on the child, never two
            self.process.join(timeout=5)
        with self._lock:
            pending, self._pending = self._pending, {}
        self._stats = EngineStats(slots_total=self.config.max_num_seqs)
        self._outgoing.put(None)
        if self._stopping:
            message = "server shutting down"
        else:
            message = "the engine process exited unexpectedly"
            log.error("engine process %d exited unexpectedly (exit code %s); failing %d requests",
                      self.process.pid, self.process.exitcode, len(pending))
        now = time.monotonic()
        for rid, (sink, arrival, prompt_tokens) in pending.items():
            out = EngineOutput(rid, finished=True, finish_reason="error", error=message, prompt_tokens=prompt_tokens)
            self.observer.on_finish(now - arrival, out)
            sink(out)


def _logging_setup() -> tuple:
    """The server's root logging level and format, for the child to log the same way to stderr."""
    root = logging.getLogger()
    fmt = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    return root.level, getattr(fmt, "_fmt", None), getattr(fmt, "datefmt", None)


# ---- the child side ----------------------------------------------------------------------------
class _Outbox(Observer):
    """Gathers the engine's outputs and observations; a writer thread sends them, one message per
    engine iteration or, when the pipe is slower than the engine, everything accumulated since."""

    def __init__(self, conn):
        self.conn, self.engine = conn, None
        self.cv = threading.Condition()
        self.outputs: list = []
        self.observations: list = []
        self.due = self.closed = False
        self.thread = threading.Thread(target=self._run, name="vlmamba-engine-outbox", daemon=True)

    def put(self, out: EngineOutput) -> None:  # every request's sink
        with self.cv:
            self.outputs.append(_pack(out))

    def _record(self, *observation) -> None:
        with self.cv:
            self.observations.append(observation)

    def on_first_token(self, ttft_s, queue_s):
        self._record("on_first_token", ttft_s, queue_s)

    def on_token(self, gap_s):
        self._record("on_token", gap_s)

    def on_step(self, batch_size):
        with self.cv:
            self.observations.append(("on_step", batch_size))
            if self.outputs:  # a prefill's first tokens: they leave while the decode step runs
                self.due = True
                self.cv.notify()

    def on_prefill(self, batch_size, tokens):
        self._record("on_prefill", batch_size, tokens)

    def on_finish(self, e2e_s, out):
        self._record("on_finish", e2e_s, out)

    def on_iteration_end(self):
        with self.cv:
            self.due = True
            self.cv.notify()

    def close(self) -> None:
        """Send what is left, then stop the writer."""
        with self.cv:
            self.closed = self.due = True
            self.cv.notify()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        name_os_thread()
        while True:
            with self.cv:
                while not self.due:
                    self.cv.wait()
                outputs, observations, closed = self.outputs, self.observations, self.closed
                self.outputs, self.observations, self.due = [], [], False
            try:
                _send(self.conn, ("burst", outputs, observations, self.engine.stats()))
            except OSError:
                return  # the server is gone
            if closed:
                return


def _child_main(conn, loader, config: EngineConfig, logging_setup: tuple) -> None:
    os.setpgrp()  # a Ctrl-C meant for the server's process group must not kill the engine mid-drain
    name_os_thread("vlmamba-engine")  # the process's name in ps and top; the engine loop is "engine"
    level, fmt, datefmt = logging_setup
    logging.basicConfig(level=level, **({"format": fmt, "datefmt": datefmt} if fmt else {}))
    threading.Thread(target=_exit_with_parent, name="vlmamba-parent-watch", daemon=True).start()
    try:
        model, processor, name = loader()
        outbox = _Outbox(conn)
        engine = Engine(model, processor, config, outbox)
    except BaseException as e:  # noqa: BLE001 - reported to the server, which refuses to start
        log.exception("the engine failed to start")
        _send(conn, ("failed", f"{type(e).__name__}: {e}"))
        return
    outbox.engine = engine
    freeze_startup_heap("engine process")  # the model, its graphs and kernels: out of every full collection
    _send(conn, ("ready", processor, name, str(engine.device)))
    engine.start()
    outbox.thread.start()
    healthy = _serve(conn, engine, outbox)
    engine.shutdown()
    outbox.close()
    if not healthy:
        raise SystemExit(1)


def _serve(conn, engine: Engine, outbox: _Outbox) -> bool:
    """Apply the server's commands until it says stop or goes away (True), or the engine loop dies."""
    while True:
        try:
            if not conn.poll(1.0):
                if not engine.alive:
                    log.error("the engine loop stopped; exiting so the server notices")
                    return False
                continue
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return True
        if msg[0] == "add":
            rid, ids, images, params, scope, session_id, arrival = msg[1:]
            inputs = [ImageInput(torch.from_numpy(px), digest) for px, digest in images]
            engine.add_request(EngineRequest(rid, ids, inputs, params, outbox.put, scope, session_id, arrival))
        elif msg[0] == "abort":
            engine.abort(msg[1])
        else:
            return True


def _exit_with_parent() -> None:
    """Exit at once if the server process dies (even while the model is still loading)."""
    from multiprocessing.connection import wait

    name_os_thread()
    wait([mp.parent_process().sentinel])
    os._exit(1)
