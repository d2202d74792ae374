"""Conversations -> (input_ids, labels, images) with the loss on assistant tokens only.

A record is LLaVA's: ``{"id", "image": path or PIL image, "conversations": [{"from": "human"|"gpt",
"value": ...}, ...]}``; ``<image>`` in a human turn marks where the image goes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Example:
    """input_ids, labels: (l,) with IGNORE on everything but assistant turns; pixel_values (i, 3, H, W)."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None


def to_messages(conversations: list[dict]) -> list[dict]:
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations]


def encode_conversation(processor, messages: list[dict], images: list, max_len: int | None = None) -> Example:
    """Tokenize turn by turn so that labels cover exactly each assistant reply (with its end token)."""
    render = processor.apply_chat_template
    n_images = sum(str(m["content"]).count(processor.image_token) for m in messages)
    if n_images != len(images):
        raise ValueError(f"conversation has {n_images} <image> markers but {len(images)} images")
    ids: list[int] = []
    labels: list[int] = []
    done = ""

    def add(text: str, train: bool) -> None:
        seg = processor.tokenize(text, text.count(processor.image_token))
        ids.extend(seg)
        labels.extend(seg if train else [IGNORE] * len(seg))

    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            head = render(messages[:k], add_generation_prompt=True)
            add(head[len(done):], False)
            done = render(messages[: k + 1], add_generation_prompt=False)
            add(done[len(head):], True)
        else:
            full = render(messages[: k + 1], add_generation_prompt=False)
            add(full[len(done):], False)
            done = full
    if max_len is not None and len(ids) > max_len:
        ids, labels = ids[:max_len], labels[:max_len]
        if ids.count(processor.image_token_id) != n_images * processor.num_image_tokens:
            raise ValueError(f"max_len {max_len} cuts through an image; raise it")
    return Example(ids, labels, processor.preprocess_images(images))


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA JSON + image folder (records without "image" are text-only)."""

    def __init__(self, json_path: str | Path, image_folder: str | Path | None, processor, max_len: int = 2048):
        self.records = json.loads(Path(json_path).read_text())
        self.folder = Path(image_folder) if image_folder else Path(json_path).parent
        self.processor, self.max_len = processor, max_len

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        r = self.records[i]
        imgs = r.get("image") or []
        imgs = [imgs] if isinstance(imgs, str) else imgs
        images = [Image.open(self.folder / p).convert("RGB") for p in imgs]
        return encode_conversation(self.processor, to_messages(r["conversations"]), images, self.max_len)


class ShapesDataset(torch.utils.data.Dataset):
    """Shapes-VQA drawn on the fly: item k is image k with all its questions as one conversation,
    in an order shuffled per item, so every question type is asked first, and also after others."""

    def __init__(self, processor, split: str = "train", n_images: int = 10000, seed: int = 0):
        self.processor, self.split, self.n, self.seed = processor, split, n_images, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> Example:
        import numpy as np

        from model.data.shapes import make_sample

        s = make_sample(self.split, k, self.seed)
        order = np.random.default_rng([self.seed, 7, k]).permutation(len(s.qas))
        msgs = []
        for n, i in enumerate(order):
            qa = s.qas[i]
            msgs += [{"role": "user", "content": ("<image>\n" if n == 0 else "") + qa.question},
                     {"role": "assistant", "content": qa.answer}]
        return encode_conversation(self.processor, msgs, [s.image()])


def collate(examples: list[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: input_ids, labels (b, l); lengths (b,); pixel_values (i, 3, H, W)."""
    L = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    pix = [e.pixel_values for e in examples if e.pixel_values is not None]
    return {"input_ids": ids, "labels": labels, "lengths": torch.tensor([len(e.input_ids) for e in examples]),
            "pixel_values": torch.cat(pix) if pix else None}
