"""Tests for the Shapes-VQA synthetic dataset (model/data/shapes.py)."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import deque

import numpy as np
import pytest
from PIL import Image

from model.data import shapes as S

N_CHECK = 300  # scenes whose pixels are decoded and checked against the QA


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pixel_cell(x: float, y: float) -> int:
    return int(y * 3 // S.IMAGE_SIZE) * 3 + int(x * 3 // S.IMAGE_SIZE)


def components(arr: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected regions of non-white pixels, as (y, x) lists."""
    mask = (arr != 255).any(axis=-1)
    seen = np.zeros_like(mask)
    regions = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, region = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] \
                            and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        regions.append(region)
    return regions


def recover(img: Image.Image) -> list[dict]:
    """Scene recovered from pixels alone, sorted by cell."""
    arr = np.asarray(img)
    found = []
    for region in components(arr):
        ys, xs = np.array(region).T
        colors = {S.classify_pixel(tuple(int(v) for v in arr[y, x])) for y, x in region}
        assert len(colors) == 1, colors
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        fill = len(region) / (w * h)
        kind = "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"
        cells = {pixel_cell(x + 0.5, y + 0.5) for y, x in region}
        assert len(cells) == 1, "a shape crosses a cell border"
        found.append({"cell": cells.pop(), "color": colors.pop(), "kind": kind,
                      "xs": xs, "ys": ys, "w": int(w), "h": int(h)})
    return sorted(found, key=lambda r: r["cell"])


@pytest.fixture(scope="module")
def samples() -> list[S.Sample]:
    return S.make_split("train", N_CHECK, seed=7)


# --- determinism and splits -------------------------------------------------

def test_same_arguments_give_identical_png_and_qa():
    for index in (0, 1, 57):
        a, b = S.make_sample("val", index, seed=3), S.make_sample("val", index, seed=3)
        assert png_bytes(a.image()) == png_bytes(b.image())
        assert a.qas == b.qas and a.scene == b.scene


def test_seed_changes_data():
    a = [png_bytes(s.image()) for s in S.make_split("train", 20, seed=0)]
    b = [png_bytes(s.image()) for s in S.make_split("train", 20, seed=1)]
    assert a != b


@pytest.mark.parametrize("other", ["test", "val"])
def test_splits_share_no_image(other):
    def hashes(split: str, seed: int) -> set[str]:
        return {hashlib.sha256(png_bytes(s.image())).hexdigest()
                for s in S.make_split(split, 200, seed)}
    train = hashes("train", 0)
    assert not train & hashes(other, 0)
    assert not train & hashes(other, 1)  # disjoint even across base seeds


def test_unknown_split_rejected():
    with pytest.raises(ValueError):
        S.make_sample("dev", 0)


# --- rendering spec ---------------------------------------------------------

def test_constants():
    assert S.SHAPES == ("circle", "square", "triangle")
    assert S.QUESTION_TYPES == ("color", "count", "exists", "where", "describe")
    assert S.CELLS[0] == "top left" and S.CELLS[4] == "center" and S.CELLS[8] == "bottom right"
    assert S.COLORS["red"] == (220, 40, 40) and S.COLORS["orange"] == (240, 130, 30)


def test_classify_pixel():
    assert S.classify_pixel((255, 255, 255)) is None
    assert S.classify_pixel((250, 252, 251)) is None
    for name, rgb in S.COLORS.items():
        assert S.classify_pixel(rgb) == name
        assert S.classify_pixel(tuple(min(255, c + 5) for c in rgb)) == name


def test_image_format_and_palette(samples):
    allowed = {(255, 255, 255), *S.COLORS.values()}
    for s in samples:
        img = s.image()
        assert img.size == (64, 64) and img.mode == "RGB"
        arr = np.asarray(img)
        assert tuple(arr[0, 0]) == (255, 255, 255)
        assert (arr == 255).all(axis=-1).mean() > 0.5  # mostly background
        assert {tuple(int(v) for v in c) for c in np.unique(arr.reshape(-1, 3), axis=0)} <= allowed


def test_scene_structure(samples):
    counts = set()
    for s in samples:
        cells = [sh.cell for sh in s.scene.shapes]
        counts.add(len(cells))
        assert 1 <= len(cells) <= 3 and cells == sorted(set(cells))
        for sh in s.scene.shapes:
            assert sh.kind in S.SHAPES and sh.color in S.COLORS and 10 <= sh.size <= 16
    assert counts == {1, 2, 3}


def test_shape_geometry(samples):
    for s in samples:
        regions = recover(s.image())
        assert [r["cell"] for r in regions] == [sh.cell for sh in s.scene.shapes]
        for r, sh in zip(regions, s.scene.shapes):
            assert 10 <= r["w"] <= 16 and 10 <= r["h"] <= 16
            assert r["w"] == r["h"] == sh.size
            fx, fy = S.cell_centre(sh.cell)
            # pixel (i) covers [i, i+1): +0.5 converts indices to coordinates
            bx = (r["xs"].min() + r["xs"].max() + 1) / 2
            by = (r["ys"].min() + r["ys"].max() + 1) / 2
            assert abs(bx - fx) <= 3 and abs(by - fy) <= 3
            mx, my = r["xs"].mean() + 0.5, r["ys"].mean() + 0.5
            assert abs(mx - fx) <= 3
            if sh.kind == "triangle":
                # area centroid of an upward triangle sits 1/6 of its height below the box centre
                assert abs(my - (by + sh.size / 6)) <= 1
            else:
                assert abs(my - fy) <= 3


def test_triangle_points_up():
    scene = S.Scene((S.Shape("triangle", "blue", 4, 16, 32, 32),))
    mask = (np.asarray(S.render(scene)) != 255).any(axis=-1)
    widths = [int(row.sum()) for row in mask if row.any()]
    assert len(widths) == 16
    assert sum(widths[:4]) < sum(widths[-4:])
    assert widths[-1] == 16 and widths[0] <= 2
    assert all(a <= b for a, b in zip(widths, widths[1:]))


# --- answers consistent with pixels -----------------------------------------

def check_answer(qa: S.QA, found: list[dict]) -> None:
    pairs = [(r["color"], r["kind"]) for r in found]
    if qa.qtype == "color":
        kind = re.fullmatch(r"What color is the (\w+)\?", qa.question).group(1)
        matches = [r for r in found if r["kind"] == kind]
        assert len(matches) == 1 and matches[0]["color"] == qa.answer
    elif qa.qtype == "count":
        assert qa.answer == str(len(found))
    elif qa.qtype == "exists":
        color, kind = re.fullmatch(r"Is there a (\w+) (\w+)\?", qa.question).groups()
        assert qa.answer == ("yes" if (color, kind) in pairs else "no")
    elif qa.qtype == "where":
        color, kind = re.fullmatch(r"Where is the (\w+) (\w+)\?", qa.question).groups()
        matches = [r for r in found if (r["color"], r["kind"]) == (color, kind)]
        assert len(matches) == 1 and S.CELLS[matches[0]["cell"]] == qa.answer
    else:
        items = [f"a {r['color']} {r['kind']} at {S.CELLS[r['cell']]}" for r in found]
        expected = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        assert qa.answer == expected


def test_answers_match_recovered_scene(samples):
    for s in samples:
        found = recover(s.image())
        assert [(r["color"], r["kind"]) for r in found] == \
            [(sh.color, sh.kind) for sh in s.scene.shapes]
        for qa in s.qas:
            check_answer(qa, found)


# --- question wording and answer vocabulary ---------------------------------

SHAPE_RE, COLOR_RE = "|".join(S.SHAPES), "|".join(S.COLORS)
CELL_RE = "|".join(S.CELLS)
ITEM_RE = rf"a ({COLOR_RE}) ({SHAPE_RE}) at ({CELL_RE})"
WORDING = {
    "color": (rf"What color is the ({SHAPE_RE})\?", rf"{COLOR_RE}"),
    "count": (r"How many shapes are there\?", r"[123]"),
    "exists": (rf"Is there a ({COLOR_RE}) ({SHAPE_RE})\?", r"yes|no"),
    "where": (rf"Where is the ({COLOR_RE}) ({SHAPE_RE})\?", CELL_RE),
    "describe": (r"Describe the image\.",
                 rf"{ITEM_RE}|{ITEM_RE} and {ITEM_RE}|{ITEM_RE}, {ITEM_RE} and {ITEM_RE}"),
}


def test_question_wording_and_vocabulary(samples):
    seen = set()
    for s in samples:
        types = [qa.qtype for qa in s.qas]
        assert types == [t for t in S.QUESTION_TYPES if t in types]  # order, no repeats
        assert {"count", "exists", "describe"} <= set(types)
        for qa in s.qas:
            q_re, a_re = WORDING[qa.qtype]
            assert re.fullmatch(q_re, qa.question), qa.question
            assert re.fullmatch(a_re, qa.answer), qa.answer
            seen.add(qa.qtype)
    assert seen == set(S.QUESTION_TYPES)


def test_color_and_where_asked_iff_applicable(samples):
    for s in samples:
        kinds = [sh.kind for sh in s.scene.shapes]
        pairs = [(sh.color, sh.kind) for sh in s.scene.shapes]
        types = {qa.qtype for qa in s.qas}
        assert ("color" in types) == any(kinds.count(k) == 1 for k in kinds)
        assert ("where" in types) == any(pairs.count(p) == 1 for p in pairs)
        for qa in s.qas:
            if qa.qtype == "color":
                kind = qa.question.split()[-1].rstrip("?")
                assert kinds.count(kind) == 1


def test_exists_balanced():
    answers = [qa.answer for s in S.make_split("test", 1000, seed=0)
               for qa in s.qas if qa.qtype == "exists"]
    assert len(answers) == 1000
    assert 0.4 <= answers.count("yes") / 1000 <= 0.6


def test_describe_separators():
    a = S.Shape("circle", "red", 0, 12, 11, 11)
    b = S.Shape("square", "blue", 4, 12, 32, 32)
    c = S.Shape("triangle", "green", 7, 12, 32, 53)
    assert S.describe(S.Scene((a,))) == "a red circle at top left"
    assert S.describe(S.Scene((a, b))) == "a red circle at top left and a blue square at center"
    assert S.describe(S.Scene((a, b, c))) == \
        "a red circle at top left, a blue square at center and a green triangle at bottom"


# --- LLaVA export -----------------------------------------------------------

def load_records(path) -> list[dict]:
    records = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(records, list)
    for rec in records:
        assert set(rec) == {"id", "image", "conversations"}
        assert not rec["image"].startswith("/")
        turns = rec["conversations"]
        assert len(turns) % 2 == 0 and turns
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(set(t) == {"from", "value"} for t in turns)
        assert turns[0]["value"].startswith("<image>\n")
        assert not any("<image>" in t["value"] for t in turns[1:])
    return records


def to_qa_pairs(turns: list[dict]) -> list[tuple[str, str]]:
    qs = [t["value"].removeprefix("<image>\n") for t in turns[0::2]]
    return list(zip(qs, [t["value"] for t in turns[1::2]]))


def test_export_multi_turn(tmp_path):
    path = S.export_llava("val", 12, tmp_path, seed=5)
    assert path == tmp_path / "val.json"
    records = load_records(path)
    samples = S.make_split("val", 12, seed=5)
    assert len(records) == 12
    for rec, s in zip(records, samples):
        assert rec["id"] == f"val_{s.index:06d}"
        assert rec["image"] == f"images/val_{s.index:06d}.png"
        img_path = tmp_path / rec["image"]
        with Image.open(img_path) as img:
            assert img.format == "PNG" and img.size == (64, 64)
            assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(s.image()))
        assert to_qa_pairs(rec["conversations"]) == [(qa.question, qa.answer) for qa in s.qas]


def test_export_one_qa_per_record(tmp_path):
    path = S.export_llava("train", 5, tmp_path, seed=2, one_qa_per_record=True)
    records = load_records(path)
    samples = S.make_split("train", 5, seed=2)
    assert len(records) == sum(len(s.qas) for s in samples)
    expected = [(f"images/train_{s.index:06d}.png", qa.question, qa.answer)
                for s in samples for qa in s.qas]
    got = []
    for rec in records:
        assert len(rec["conversations"]) == 2
        (q, a), = to_qa_pairs(rec["conversations"])
        got.append((rec["image"], q, a))
    assert got == expected
    assert len({rec["id"] for rec in records}) == len(records)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == \
        [f"train_{i:06d}.png" for i in range(5)]


def test_export_is_deterministic(tmp_path):
    a = S.export_llava("test", 4, tmp_path / "a", seed=9)
    b = S.export_llava("test", 4, tmp_path / "b", seed=9)
    assert a.read_bytes() == b.read_bytes()
    for i in range(4):
        name = f"images/test_{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_main_cli(tmp_path, capsys):
    assert S.main(["--split", "val", "--n", "3", "--seed", "1", "--out", str(tmp_path)]) == 0
    assert len(load_records(tmp_path / "val.json")) == 3
    with pytest.raises(SystemExit):
        S.main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--split", "--n", "--seed", "--out", "--one-qa-per-record"):
        assert flag in help_text
