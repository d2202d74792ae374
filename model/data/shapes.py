"""Shapes-VQA: a tiny synthetic visual-question-answering dataset.

Each image is 64x64 RGB on white, a 3x3 grid holding 1-3 flat-coloured shapes
(one per cell).  Every image comes with questions of five types whose answers
are derived from the scene, so the whole dataset is reproducible from a seed.
Splits can be exported in LLaVA's conversation JSON format.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 200),
    "orange": (240, 130, 30),
}
CELLS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
_PALETTE_NAMES: tuple[str | None, ...] = (None, *COLORS)
_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.int64)
QUESTION_TYPES: tuple[str, ...] = ("color", "count", "exists", "where", "describe")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
MIN_SIZE, MAX_SIZE, JITTER, MAX_SHAPES = 10, 16, 2, 3


@dataclass(frozen=True)
class Shape:
    """One drawn shape; (cx, cy) is its integer pixel centre after jitter."""

    kind: str
    color: str
    cell: int
    size: int
    cx: int
    cy: int

    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive pixel box (x0, y0, x1, y1) of side `size` around the centre."""
        x0, y0 = self.cx - self.size // 2, self.cy - self.size // 2
        return x0, y0, x0 + self.size - 1, y0 + self.size - 1


@dataclass(frozen=True)
class QA:
    """One question/answer pair; `qtype` is one of QUESTION_TYPES."""

    qtype: str
    question: str
    answer: str


@dataclass(frozen=True)
class Scene:
    """The shapes of one image, sorted by cell index (row-major)."""

    shapes: tuple[Shape, ...]


def cell_centre(cell: int) -> tuple[float, float]:
    """Exact (x, y) centre of a grid cell in pixel coordinates."""
    row, col = divmod(cell, 3)
    step = IMAGE_SIZE / 3
    return (col + 0.5) * step, (row + 0.5) * step


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a random scene: 1-3 shapes in distinct cells, random kind/colour/size/jitter."""
    n = int(rng.integers(1, MAX_SHAPES + 1))
    cells = sorted(int(c) for c in rng.choice(len(CELLS), size=n, replace=False))
    names = list(COLORS)
    shapes = []
    for cell in cells:
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        color = names[int(rng.integers(len(names)))]
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        jx, jy = (int(j) for j in rng.integers(-JITTER, JITTER + 1, size=2))
        fx, fy = cell_centre(cell)
        shapes.append(Shape(kind, color, cell, size, round(fx) + jx, round(fy) + jy))
    return Scene(tuple(shapes))


def render(scene: Scene) -> Image.Image:
    """Rasterise a scene to a 64x64 RGB image (hard edges: only palette colours + white)."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x0, y0, x1, y1 = s.bbox()
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return img


def _phrase(s: Shape) -> str:
    return f"a {s.color} {s.kind} at {CELLS[s.cell]}"


def describe(scene: Scene) -> str:
    """Row-major description: 'a X at A', 'a X at A and a Y at B', 'a X at A, a Y at B and a Z at C'."""
    parts = [_phrase(s) for s in sorted(scene.shapes, key=lambda s: s.cell)]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def questions(scene: Scene, rng: np.random.Generator) -> list[QA]:
    """One QA per applicable question type, in QUESTION_TYPES order."""
    kinds = [s.kind for s in scene.shapes]
    pairs = [(s.color, s.kind) for s in scene.shapes]
    qas: list[QA] = []
    unique_kinds = [k for k in SHAPES if kinds.count(k) == 1]
    if unique_kinds:
        kind = _pick(rng, unique_kinds)
        color = next(s.color for s in scene.shapes if s.kind == kind)
        qas.append(QA("color", f"What color is the {kind}?", color))
    qas.append(QA("count", "How many shapes are there?", str(len(scene.shapes))))
    # Coin flip first so that yes/no are balanced regardless of scene statistics.
    if rng.random() < 0.5:
        color, kind, answer = *_pick(rng, sorted(set(pairs))), "yes"
    else:
        absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in pairs]
        color, kind, answer = *_pick(rng, absent), "no"
    qas.append(QA("exists", f"Is there a {color} {kind}?", answer))
    unique_pairs = [s for s in scene.shapes if pairs.count((s.color, s.kind)) == 1]
    if unique_pairs:
        s = _pick(rng, unique_pairs)
        qas.append(QA("where", f"Where is the {s.color} {s.kind}?", CELLS[s.cell]))
    qas.append(QA("describe", "Describe the image.", describe(scene)))
    return qas


@dataclass(frozen=True)
class Sample:
    """A scene plus its questions, identified by (split, index)."""

    split: str
    index: int
    scene: Scene
    qas: tuple[QA, ...]

    def image(self) -> Image.Image:
        """Render this sample's image."""
        return render(self.scene)


def scene_split(scene: Scene) -> str:
    """Split that owns this scene, from a stable hash of its content."""
    key = repr([(s.kind, s.color, s.cell, s.size, s.cx, s.cy) for s in scene.shapes])
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return list(SPLITS)[int.from_bytes(digest, "big") % len(SPLITS)]


def make_sample(split: str, index: int, seed: int = 0) -> Sample:
    """Deterministic sample #index of a split; same arguments give identical output."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    # Separate RNG streams alone could still collide on the small scene space
    # (one-shape scenes especially); owning scenes by content hash makes splits
    # disjoint by construction, for any seeds.
    scene = sample_scene(rng)
    while scene_split(scene) != split:
        scene = sample_scene(rng)
    return Sample(split, index, scene, tuple(questions(scene, rng)))


def make_split(split: str, n: int, seed: int = 0) -> list[Sample]:
    """Samples 0..n-1 of a split."""
    return [make_sample(split, i, seed) for i in range(n)]


def _turns(qas: Sequence[QA]) -> list[dict[str, str]]:
    turns = []
    for i, qa in enumerate(qas):
        prefix = "<image>\n" if i == 0 else ""
        turns.append({"from": "human", "value": prefix + qa.question})
        turns.append({"from": "gpt", "value": qa.answer})
    return turns


def export_llava(split: str, n: int, out_dir: str | Path, seed: int = 0,
                 one_qa_per_record: bool = False) -> Path:
    """Write out_dir/images/{split}_{index:06d}.png and out_dir/{split}.json; return the JSON path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for sample in make_split(split, n, seed):
        name = f"{split}_{sample.index:06d}"
        rel = f"images/{name}.png"
        sample.image().save(out / rel, format="PNG")
        if one_qa_per_record:
            records += [{"id": f"{name}_{qa.qtype}", "image": rel, "conversations": _turns([qa])}
                        for qa in sample.qas]
        else:
            records.append({"id": name, "image": rel, "conversations": _turns(sample.qas)})
    path = out / f"{split}.json"
    path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return path


def classify_pixel(rgb: Sequence[int]) -> str | None:
    """Nearest palette colour name for an RGB triple, or None if nearest to white."""
    dist = ((_PALETTE - np.asarray(rgb[:3], dtype=np.int64)) ** 2).sum(axis=1)
    return _PALETTE_NAMES[int(dist.argmin())]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: export one split of Shapes-VQA in LLaVA format."""
    parser = argparse.ArgumentParser(
        prog="vlmamba shapes-export",
        description="Generate the synthetic Shapes-VQA dataset (64x64 images of 1-3 coloured "
                    "shapes on a 3x3 grid, with questions and answers) and write it as a "
                    "LLaVA-style JSON file plus a folder of PNG images.")
    parser.add_argument("--split", choices=list(SPLITS), default="train",
                        help="which split to generate; splits never share an image (default: train)")
    parser.add_argument("--n", type=int, default=1000,
                        help="number of images to generate (default: 1000)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base random seed; the same seed, split and n reproduce "
                             "byte-identical files (default: 0)")
    parser.add_argument("--out", default="data/shapes",
                        help="output folder; receives SPLIT.json and images/ (default: data/shapes)")
    parser.add_argument("--one-qa-per-record", action="store_true",
                        help="write one record per question instead of one multi-turn "
                             "conversation per image")
    args = parser.parse_args(argv)
    path = export_llava(args.split, args.n, args.out, args.seed, args.one_qa_per_record)
    print(f"wrote {args.n} {args.split} images and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
