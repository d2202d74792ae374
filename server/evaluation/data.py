"""Evaluation items, and reading benchmark files: JSON / JSONL, image folders, images as data: URLs."""

from __future__ import annotations

import base64
import fnmatch
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LLAVA_SUFFIXES = ("\nAnswer the question using a single word or phrase.",
                  "\nAnswer with the option's letter from the given choices directly.")


class DataError(Exception):
    """The benchmark files are missing or not in the expected format (the message says what to do)."""


@dataclass
class Image:
    """An image to send: a file, base64 text (MMBench's TSV), or a function producing a PIL image."""

    path: Path | None = None
    b64: str | None = None
    render: Callable[[], Any] | None = None

    def data_url(self) -> str:
        if self.b64 is not None:
            raw_head = base64.b64decode(self.b64[:24] + "=" * (-len(self.b64[:24]) % 4), validate=False)
            return f"data:{_mime(raw_head)};base64,{self.b64}"
        if self.render is not None:
            buf = io.BytesIO()
            self.render().save(buf, format="PNG")
            raw = buf.getvalue()
        else:
            raw = Path(self.path).read_bytes()
        return f"data:{_mime(raw[:16])};base64,{base64.b64encode(raw).decode()}"


def _mime(head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if head.startswith(b"GIF8"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"BM"):
        return "image/bmp"
    return "image/jpeg"


@dataclass
class Source:
    """Where a task's files are: --data, and the optional overrides --questions, --annotations, --images."""

    data: Path | None = None
    questions: Path | None = None
    annotations: Path | None = None
    images: Path | None = None
    split: str | None = None
    limit: int | None = None

    @property
    def root(self) -> Path:
        """The benchmark's folder: --data, or the folder of the question file."""
        base = self.data or self.questions
        if base is None:
            raise DataError("this task needs --data (the benchmark's folder; see docs/eval.md)")
        if not base.exists():
            raise DataError(f"{base} does not exist")
        return base.parent if base.is_file() else base

    def question_file(self, patterns: Sequence[str], what: str, expected: str) -> Path:
        if self.questions is not None:
            return self.questions
        if self.data is not None and self.data.is_file():
            return self.data
        return require(find_file(self.root, patterns, what), what, self.root, expected)

    def image_roots(self, *subdirs: str) -> list[Path]:
        roots = [self.images] if self.images else []
        return roots + [self.root / d for d in subdirs] + [self.root]


@dataclass
class Result:
    """A task's scores: ``metrics`` in display order (percent, or points for MME), ``headline`` the one
    compared with the paper, ``breakdown`` {row: {column: value}} under ``breakdown_label``."""

    metrics: dict[str, float] = field(default_factory=dict)
    headline: str | None = None
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    breakdown_label: str = "category"
    notes: list[str] = field(default_factory=list)
    scored: int = 0


@dataclass(frozen=True)
class TaskSpec:
    """A benchmark: how to load its items and score the answers, and its default prompt and paper number."""

    name: str
    title: str
    load: Callable[[Source], list["Item"]]
    score: Callable[[list["Item"], dict[str, dict]], Result]
    template: str = "{question}"
    suffix: str = "\nAnswer the question using a single word or phrase."
    max_tokens: int = 16
    paper: float | None = None
    needs_data: bool = True
    needs_judge: bool = False


@dataclass
class Item:
    """One request to send and what is needed to score its answer.

    ``fields`` fill the prompt template ({question}, {options}, {context}); ``truth`` is the ground truth (None
    when the data has none); ``group`` ties items that are scored together (an MME image's two questions, an
    MMBench question's rotations); ``part`` is a separately scored part (POPE split, MME subtask) and
    ``category`` the key of the per-category breakdown."""

    qid: str
    fields: dict[str, str]
    image: Image | None
    truth: Any = None
    group: str = ""
    part: str = ""
    category: str = ""
    meta: dict = field(default_factory=dict)
    prompt: str = ""

    def __post_init__(self):
        self.group = self.group or self.qid


def limit_items(items: list[Item], limit: int | None) -> list[Item]:
    """The first ``limit`` groups of each part (all items when limit is None)."""
    if limit is None:
        return items
    seen: dict[str, list[str]] = {}
    out = []
    for it in items:
        groups = seen.setdefault(it.part, [])
        if it.group not in groups:
            if len(groups) >= limit:
                continue
            groups.append(it.group)
        out.append(it)
    return out


def strip_llava_prompt(text: str) -> str:
    """A LLaVA eval-file question without its image marker and its standard answer-format suffix."""
    text = text.removeprefix("<image>\n").removeprefix("<image>")
    for suffix in LLAVA_SUFFIXES:
        if text.endswith(suffix):
            return text[: -len(suffix)]
    return text


# ---- files --------------------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def read_jsonl(path: Path) -> list[dict]:
    """JSON lines (blank lines skipped); a file holding one JSON array is accepted too."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not a JSON line ({e})") from e
    return out


def find_file(root: Path, patterns: Sequence[str], what: str, flag: str = "--questions") -> Path | None:
    """The one file in ``root`` (not recursive) matching the first pattern that matches anything."""
    if root.is_file():
        return root
    names = sorted(p.name for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatch(n.lower(), pattern.lower())]
        if len(hits) == 1:
            return root / hits[0]
        if len(hits) > 1:
            raise DataError(f"several candidate {what} files in {root}: {', '.join(hits)}; choose one with {flag}")
    return None


def require(path: Path | None, what: str, where: Path, expected: str) -> Path:
    if path is None:
        raise DataError(f"no {what} found in {where} (expected {expected}; see docs/eval.md)")
    return path


class ImageFinder:
    """Finds image files under some folders by relative path, file name or file name without extension.

    Direct paths are tried first; the folders are scanned (recursively, once) only when that fails."""

    def __init__(self, roots: Iterable[Path]):
        self.roots = [Path(r) for r in dict.fromkeys(roots) if Path(r).is_dir()]
        self._names: dict[str, Path] | None = None

    def _index(self) -> dict[str, Path]:
        if self._names is None:
            self._names = {}
            for root in self.roots:
                for dirpath, _, files in os.walk(root):
                    for f in files:
                        if f.lower().endswith(IMAGE_EXTENSIONS):
                            path = Path(dirpath) / f
                            self._names.setdefault(f, path)
                            self._names.setdefault(os.path.splitext(f)[0], path)
        return self._names

    def find(self, *keys: str) -> Path | None:
        for key in keys:
            for root in self.roots:
                path = root / key
                if path.is_file():
                    return path
        names = self._index()
        for key in keys:
            name = os.path.basename(key)
            if name in names:
                return names[name]
        return None


def check_images(items: list[Item], hint: str) -> None:
    """Fail early, listing a few, when image files could not be found."""
    missing = [it.meta.get("image_name", it.qid) for it in items if it.image is None and it.meta.get("needs_image")]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} images not found ({shown}); {hint}")


def image_of(finder: ImageFinder, *keys: str) -> Image | None:
    path = finder.find(*keys)
    return Image(path=path) if path else None
