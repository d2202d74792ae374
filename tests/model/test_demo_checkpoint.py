import time

import pytest
import torch

from model.checkpoint_vlm import load_vlmamba
from model.data.shapes import make_sample
from model.demo import DEMO_CHECKPOINT
from model.generate import generate
from model.sampling import SamplingParams
from model.training.eval_shapes import greedy_batch


@pytest.fixture(scope="module")
def demo():
    return load_vlmamba(DEMO_CHECKPOINT)


def test_demo_checkpoint_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in DEMO_CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20


@torch.no_grad()
def test_demo_answers_fixed_test_questions(demo):
    model, proc = demo
    items = [(qa, s) for s in (make_sample("test", i) for i in range(12)) for qa in s.qas]
    answers = greedy_batch(model, proc, [("<image>\n" + qa.question, [s.image()]) for qa, s in items])
    wrong = [(qa.question, qa.answer, a) for (qa, _), a in zip(items, answers) if a.strip() != qa.answer]
    print(f"{len(items) - len(wrong)}/{len(items)} right; wrong: {wrong}")
    assert len(items) >= 50 and len(wrong) <= 1
    assert {qa.qtype for qa, _ in items} == {"color", "count", "exists", "where", "describe"}


@torch.no_grad()
def test_demo_chat_follow_up_and_cpu_latency(demo):
    model, proc = demo
    s = make_sample("test", 3)
    q = next(qa for qa in s.qas if qa.qtype == "describe")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.question}]}]
    t = time.perf_counter()
    g = generate(model, proc, msgs, images=[s.image()], params=SamplingParams(temperature=0, max_tokens=40))
    print(f"describe answered in {time.perf_counter() - t:.3f}s")  # a figure, not asserted: timing is for benchmarks
    assert g.text == q.answer and g.finish_reason == "stop"
    count = next(qa for qa in s.qas if qa.qtype == "count")
    msgs += [{"role": "assistant", "content": g.text}, {"role": "user", "content": count.question}]
    g2 = generate(model, proc, msgs, images=[s.image()], params=SamplingParams(temperature=0, max_tokens=5))
    assert g2.text == count.answer
