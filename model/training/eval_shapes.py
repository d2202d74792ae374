"""Exact-match accuracy per question type on the Shapes-VQA test split (batched greedy decoding)."""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm import tqdm

from model.data.shapes import QUESTION_TYPES, make_sample


@torch.no_grad()
def greedy_batch(model, processor, prompts: list[tuple[str, list]], max_new_tokens: int = 32) -> list[str]:
    """Answer a batch of (user text with <image> markers, images) greedily; right-padded prefill."""
    device = model.llm.backbone.embedding.weight.device
    encs = [processor.encode_messages([{"role": "user", "content": t}], imgs) for t, imgs in prompts]
    b, L = len(encs), max(len(e.input_ids) for e in encs)
    ids = torch.zeros(b, L, dtype=torch.long)
    for i, e in enumerate(encs):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
    pix = [e.pixel_values for e in encs if e.pixel_values is not None]
    pix = torch.cat(pix).to(device) if pix else None
    state, slots = model.allocate_state(b), torch.arange(b, device=device)
    lengths = torch.tensor([len(e.input_ids) for e in encs], device=device)
    logits = model(ids.to(device), pix, state=state, slots=slots, lengths=lengths, last_only=True)
    n_real, eos = len(processor.tokenizer), set(processor.eos_token_ids)
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits[:, n_real:] = float("-inf")
        logits[:, processor.image_token_id] = float("-inf")
        tok = logits.argmax(-1)
        for i, t in enumerate(tok.tolist()):
            if not done[i]:
                done[i] = t in eos
                if not done[i]:
                    out[i].append(t)
        if bool(done.all()):
            break
        logits = model.step(tok, state=state, slots=slots)
    return [processor.tokenizer.decode(o, skip_special_tokens=True) for o in out]


def evaluate_shapes(model, processor, n_images: int = 200, seed: int = 0, batch_size: int = 64,
                    split: str = "test", progress: bool = True) -> dict[str, dict[str, float]]:
    """Ask every question of ``n_images`` images; returns {qtype: {"correct", "total", "accuracy"}}."""
    items = [(qa, s) for s in (make_sample(split, i, seed) for i in range(n_images)) for qa in s.qas]
    score: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for k in tqdm(range(0, len(items), batch_size), disable=not progress, desc="eval-shapes"):
        chunk = items[k:k + batch_size]
        answers = greedy_batch(model, processor, [("<image>\n" + qa.question, [s.image()]) for qa, s in chunk])
        for (qa, _), a in zip(chunk, answers):
            score[qa.qtype][0] += int(a.strip() == qa.answer)
            score[qa.qtype][1] += 1
    return {q: {"correct": c, "total": t, "accuracy": c / t} for q in QUESTION_TYPES if q in score
            for c, t in [score[q]]}


def format_table(result: dict[str, dict[str, float]]) -> str:
    rows = ["| question type | correct | total | accuracy |", "|---|---|---|---|"]
    rows += [f"| {q} | {r['correct']} | {r['total']} | {100 * r['accuracy']:.1f} % |" for q, r in result.items()]
    return "\n".join(rows)
