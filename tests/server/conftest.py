import hashlib
import threading
import time

import pytest

from model.checkpoint_vlm import load_vlmamba
from model.data.shapes import make_sample
from model.demo import DEMO_CHECKPOINT
from model.sampling import SamplingParams
from server.engine import EngineRequest, ImageInput


@pytest.fixture(scope="session")
def demo():
    return load_vlmamba(DEMO_CHECKPOINT)


@pytest.fixture(scope="module")
def samples():
    """Test-split scenes of the shapes data set, each with its questions and answers."""
    return [make_sample("test", i) for i in range(40)]


@pytest.fixture(scope="module")
def images(samples):
    """An image server with sample ``i`` at ``/s{i}.png``."""
    from tests.server.live import ImageServer

    srv = ImageServer({f"s{i}": s.image() for i, s in enumerate(samples)})
    yield srv
    srv.close()


def image_input(proc, image) -> ImageInput:
    px = proc.preprocess_images([image])[0]
    return ImageInput(px, hashlib.sha256(px.numpy().tobytes()).hexdigest()[:16])


class Collector:
    """A request sink that gathers outputs and signals completion."""

    def __init__(self):
        self.outputs, self.done = [], threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        if out.finished:
            self.done.set()

    @property
    def text(self):
        return "".join(o.text for o in self.outputs)

    @property
    def final(self):
        return self.outputs[-1]


def make_request(proc, rid, messages, images, collector, max_tokens=40, **kw):
    text = proc.apply_chat_template(messages)
    ids = proc.tokenize(text, len(images))
    return EngineRequest(rid, ids, [image_input(proc, im) for im in images],
                         SamplingParams(temperature=0, max_tokens=max_tokens), collector, **kw)


def user(text, with_image=True):
    parts = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def submit_decoding(engine, proc, rid, messages, images, collector, max_tokens=60):
    """Submit a request that runs to ``max_tokens`` (ignore_eos) and return it once it is
    decoding (three outputs in), so that the next request arrives while it runs."""
    req = make_request(proc, rid, messages, images, collector, max_tokens=max_tokens)
    req.params.ignore_eos = True
    engine.add_request(req)
    deadline = time.time() + 30
    while len(collector.outputs) < 3 and time.time() < deadline:
        time.sleep(0.001)
    assert not collector.done.is_set(), f"request {rid} must still be decoding when the next one arrives"
    return req
