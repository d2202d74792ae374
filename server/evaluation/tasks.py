"""Open-answer tasks (VQAv2, TextVQA, GQA, POPE, MME, Shapes-VQA): loading each benchmark's files and scoring.

Every loader takes a :class:`Source` and returns :class:`Item` s; every scorer takes the items and the
predictions file's records ({qid: {"prediction": ...}}) and returns a :class:`Result`. docs/eval.md describes
the file layouts."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from server.evaluation import metrics as M
from server.evaluation.data import (DataError, Image, ImageFinder, Item, Result, Source, TaskSpec, find_file,
                                    image_of, read_json, read_jsonl, strip_llava_prompt)
from server.evaluation.normalize import normalize_short


def prediction(records: dict[str, dict], qid: str) -> str:
    """The answer recorded for a question ("" if its request failed or it was never asked)."""
    return (records.get(qid) or {}).get("prediction") or ""


def _percent(x: float) -> float:
    return round(100 * x, 2)


def _no_truth(items: list[Item], what: str) -> Result:
    return Result(notes=[f"no ground truth for these {len(items)} questions ({what}): predictions only"])


def _by_category(scored: list[tuple[Item, float]], column: str = "accuracy") -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for it, value in scored:
        if it.category:
            groups[it.category].append(value)
    return {c: {column: _percent(M.mean(v)), "n": len(v)} for c, v in sorted(groups.items())}


# ---- LLaVA eval .jsonl question files (shared by VQAv2, TextVQA, GQA) ------------------------------------
def _llava_questions(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    for r in rows[:1]:
        if not {"question_id", "image", "text"} <= set(r):
            raise DataError(f"{path}: LLaVA eval lines need question_id, image and text; got {sorted(r)}")
    return [{"qid": str(r["question_id"]), "question": strip_llava_prompt(r["text"]), "image_keys": [r["image"]],
             "category": r.get("category", "")} for r in rows]


def _items(rows: list[dict], finder: ImageFinder, truth: dict[str, dict]) -> list[Item]:
    out = []
    for r in rows:
        t = truth.get(r["qid"], {})
        out.append(Item(r["qid"], {"question": r["question"]}, image_of(finder, *r["image_keys"]),
                        t.get("truth"), category=t.get("category") or r.get("category", ""),
                        meta={"image_name": r["image_keys"][0], "needs_image": True}))
    return out


# ---- VQAv2 ------------------------------------------------------------------------------------------------
def load_vqav2(src: Source) -> list[Item]:
    qfile = src.question_file(["llava_vqav2*.jsonl", "*.jsonl", "*questions*.json"], "VQAv2 question",
                              "v2_OpenEnded_mscoco_<split>_questions.json or LLaVA's llava_vqav2_*.jsonl")
    subtype = ""
    if qfile.suffix == ".jsonl":
        rows = _llava_questions(qfile)
    else:
        data = read_json(qfile)
        if not isinstance(data, dict) or "questions" not in data:
            raise DataError(f"{qfile}: expected the official VQA questions JSON ({{\"questions\": [...]}})")
        # test-dev questions (data_subtype "test-dev2015") are about test2015 images
        subtype = data.get("data_subtype", "").replace("test-dev", "test")
        rows = []
        for q in data["questions"]:
            iid = int(q["image_id"])
            keys = [f"COCO_{subtype}_{iid:012d}.jpg", f"COCO_{subtype}_{iid:012d}", f"{iid:012d}", str(iid)]
            rows.append({"qid": str(q["question_id"]), "question": q["question"], "image_keys": keys})
    afile = src.annotations
    if afile is None and src.root.is_dir():
        candidates = sorted(src.root.glob("*annotations*.json"))
        if subtype and len(candidates) > 1:
            candidates = [p for p in candidates if subtype in p.name] or candidates
        if len(candidates) > 1:
            raise DataError(f"several annotation files in {src.root}; choose one with --annotations")
        afile = candidates[0] if candidates else None
    truth = {}
    if afile is not None:
        for a in read_json(afile)["annotations"]:
            truth[str(a["question_id"])] = {"truth": [x["answer"] for x in a["answers"]],
                                            "category": a.get("answer_type", "")}
    finder = ImageFinder(src.image_roots(*(f"{p}{subtype}" for p in ("", "images/") if subtype), "images"))
    return _items(rows, finder, truth)


def score_vqa(items: list[Item], records: dict[str, dict]) -> Result:
    known = [it for it in items if it.truth]
    if not known:
        return _no_truth(items, "no annotations file; submit the EvalAI answers file to the benchmark server")
    scored = [(it, M.vqa_accuracy(prediction(records, it.qid), it.truth)) for it in known]
    return Result({"accuracy": _percent(M.mean(s for _, s in scored))}, "accuracy",
                  _by_category(scored), "answer type", scored=len(scored))


# ---- TextVQA ----------------------------------------------------------------------------------------------
def load_textvqa(src: Source) -> list[Item]:
    qfile = src.question_file(["llava_textvqa*.jsonl", "*.jsonl", "TextVQA_*val*.json", "*textvqa*.json"],
                              "TextVQA question", "TextVQA_0.5.1_val.json or LLaVA's llava_textvqa_*.jsonl")
    afile = src.annotations
    if afile is None and qfile.suffix == ".json":
        afile = qfile
    if afile is None and src.root.is_dir():
        afile = find_file(src.root, ["TextVQA_*val*.json", "*textvqa*.json"], "TextVQA annotation", "--annotations")
    truth, by_id = {}, {}
    if afile is not None:
        data = read_json(afile)
        if not isinstance(data, dict) or "data" not in data:
            raise DataError(f"{afile}: expected TextVQA's JSON ({{\"data\": [...]}})")
        for d in data["data"]:
            by_id[str(d["question_id"])] = d
            if d.get("answers"):
                truth[str(d["question_id"])] = {"truth": d["answers"]}
    if qfile.suffix == ".jsonl":
        rows = _llava_questions(qfile)
    else:
        rows = [{"qid": q, "question": d["question"], "image_keys": [f"{d['image_id']}.jpg", d["image_id"]]}
                for q, d in by_id.items()]
    finder = ImageFinder(src.image_roots("train_images", "train_val_images/train_images", "images"))
    return _items(rows, finder, truth)


# ---- GQA --------------------------------------------------------------------------------------------------
def load_gqa(src: Source) -> list[Item]:
    qfile = src.question_file(["llava_gqa*.jsonl", "*.jsonl", "testdev_balanced_questions.json",
                               "*questions*.json"], "GQA question",
                              "testdev_balanced_questions.json or LLaVA's llava_gqa_testdev_balanced.jsonl")
    afile = src.annotations or (qfile if qfile.suffix == ".json" else None)
    if afile is None and src.root.is_dir():
        afile = find_file(src.root, ["testdev_balanced_questions.json", "*questions*.json"], "GQA", "--annotations")
    entries = {}
    if afile is not None:
        entries = read_json(afile)
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in list(entries.values())[:5]):
            raise DataError(f"{afile}: expected GQA's questions JSON ({{question_id: {{imageId, question, answer}}}})")
    truth = {q: {"truth": e["answer"], "category": (e.get("types") or {}).get("structural", "")}
             for q, e in entries.items() if "answer" in e}
    if qfile.suffix == ".jsonl":
        rows = _llava_questions(qfile)
    else:
        rows = [{"qid": q, "question": e["question"], "image_keys": [f"{e['imageId']}.jpg", e["imageId"]]}
                for q, e in entries.items()]
    return _items(rows, ImageFinder(src.image_roots("images")), truth)


def score_exact(items: list[Item], records: dict[str, dict], normalize=normalize_short) -> Result:
    known = [it for it in items if it.truth is not None]
    if not known:
        return _no_truth(items, "the question file has no answers")
    scored = [(it, float(M.exact_match(prediction(records, it.qid), it.truth, normalize))) for it in known]
    return Result({"accuracy": _percent(M.mean(s for _, s in scored))}, "accuracy", _by_category(scored),
                  "question type", scored=len(scored))


# ---- POPE -------------------------------------------------------------------------------------------------
POPE_SPLITS = ("random", "popular", "adversarial")


def load_pope(src: Source) -> list[Item]:
    root, items = src.root, []
    splits = [src.split] if src.split else list(POPE_SPLITS)
    finder = ImageFinder(src.image_roots("val2014", "images") + [root.parent / "val2014"])
    for split in splits:
        path = find_file(root, [f"*pope_{split}*.json*"], f"POPE {split}") or \
            find_file(root / "coco", [f"*pope_{split}*.json*"], f"POPE {split}")
        if path is None:
            if src.split:
                raise DataError(f"no POPE file for split {split!r} in {root} (expected coco_pope_{split}.json)")
            continue
        for r in read_jsonl(path):
            items.append(Item(f"{split}/{r['question_id']}", {"question": r["text"]}, image_of(finder, r["image"]),
                              r.get("label"), part=split, meta={"image_name": r["image"], "needs_image": True}))
    if not items:
        raise DataError(f"no POPE files in {root} (expected coco_pope_random.json, coco_pope_popular.json, "
                        "coco_pope_adversarial.json)")
    return items


def score_pope(items: list[Item], records: dict[str, dict]) -> Result:
    parts: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        if it.truth is not None:
            parts[it.part].append(it)
    if not parts:
        return _no_truth(items, "no labels")
    rows = {}
    for split in sorted(parts, key=lambda s: POPE_SPLITS.index(s) if s in POPE_SPLITS else 99):
        its = parts[split]
        s = M.pope_scores([prediction(records, it.qid) for it in its], [it.truth for it in its])
        rows[split] = {k: (_percent(v) if k != "n" else v) for k, v in s.as_dict().items()}
    avg = lambda k: round(M.mean(r[k] for r in rows.values()), 2)  # noqa: E731
    return Result({"f1": avg("f1"), "accuracy": avg("accuracy"), "precision": avg("precision"),
                   "recall": avg("recall"), "yes_ratio": avg("yes_ratio")}, "f1", rows, "split",
                  ["POPE: means over the splits; the paper's number is the F1 score"],
                  scored=sum(len(v) for v in parts.values()))


# ---- MME --------------------------------------------------------------------------------------------------
def load_mme(src: Source) -> list[Item]:
    root = src.root
    if (root / "MME_Benchmark_release_version").is_dir():
        root = root / "MME_Benchmark_release_version"
    items = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = sub / "questions_answers_YN"
        texts = sorted(qa_dir.glob("*.txt")) if qa_dir.is_dir() else sorted(sub.glob("*.txt"))
        if not texts:
            continue
        finder = ImageFinder([sub / "images", sub])
        for txt in texts:
            image = image_of(finder, *(txt.stem + ext for ext in (".jpg", ".png", ".jpeg")))
            name = image.path.name if image else txt.stem
            lines = [ln for ln in txt.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            for k, line in enumerate(lines):
                question, sep, answer = line.rpartition("\t")
                if not sep:
                    raise DataError(f"{txt}: line {k + 1} is not 'question<TAB>answer'")
                items.append(Item(f"{sub.name}/{name}/{k}", {"question": question.strip()}, image,
                                  answer.strip().lower(), group=f"{sub.name}/{name}", part=sub.name,
                                  meta={"image_name": f"{sub.name}/{txt.stem}.*", "needs_image": True}))
    if not items:
        raise DataError(f"no MME subtask folders in {root} (expected e.g. existence/*.jpg + *.txt or "
                        "artwork/images/ + artwork/questions_answers_YN/)")
    return items


def score_mme(items: list[Item], records: dict[str, dict]) -> Result:
    rows_by_part: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for it in items:
        rows_by_part[it.part].append((it.group, prediction(records, it.qid), it.truth))
    subtasks = {p: M.mme_subtask(rows) for p, rows in rows_by_part.items()}
    totals = M.mme_totals(subtasks)
    known = set(M.MME_PERCEPTION) | set(M.MME_COGNITION)
    order = [s for s in (*M.MME_PERCEPTION, *M.MME_COGNITION) if s in subtasks] + sorted(set(subtasks) - known)
    rows = {s: {"accuracy": _percent(subtasks[s].accuracy), "accuracy_plus": _percent(subtasks[s].accuracy_plus),
                "score": round(subtasks[s].score, 2)} for s in order}
    notes = []
    missing = [s for s in (*M.MME_PERCEPTION, *M.MME_COGNITION) if s not in subtasks]
    if missing:
        notes.append(f"MME subtasks not in the data (counted as 0): {', '.join(missing)}")
    if set(subtasks) - known:
        notes.append(f"unknown MME subtasks (in no total): {', '.join(sorted(set(subtasks) - known))}")
    return Result({"perception": round(totals["perception"], 2), "cognition": round(totals["cognition"], 2)},
                  "perception", rows, "subtask", notes, scored=len(items))


# ---- Shapes-VQA -------------------------------------------------------------------------------------------
def load_shapes(src: Source, default_images: int = 500) -> list[Item]:
    from model.data.shapes import make_sample

    split = src.split or "test"
    n = src.limit or default_images
    items = []
    for i in range(n):
        sample = make_sample(split, i)
        image = Image(render=sample.image)
        items.extend(Item(f"{split}/{i}/{qa.qtype}", {"question": qa.question}, image, qa.answer,
                          group=f"{split}/{i}", category=qa.qtype) for qa in sample.qas)
    return items


def score_shapes(items: list[Item], records: dict[str, dict]) -> Result:
    return score_exact(items, records, normalize=str.strip)


def _registry() -> dict[str, TaskSpec]:
    from server.evaluation.tasks_choice import MMBENCH, MMVET, SCIENCEQA_IMG

    specs = [
        TaskSpec("vqav2", "VQAv2", load_vqav2, score_vqa, paper=76.6),
        TaskSpec("gqa", "GQA", load_gqa, score_exact, paper=56.2),
        SCIENCEQA_IMG,
        TaskSpec("textvqa", "TextVQA", load_textvqa, score_vqa, paper=48.9),
        TaskSpec("pope", "POPE", load_pope, score_pope, paper=84.4),
        TaskSpec("mme", "MME", load_mme, score_mme, paper=1369.6),
        MMBENCH,
        MMVET,
        TaskSpec("shapes", "Shapes-VQA", load_shapes, score_shapes, suffix="", max_tokens=64,
                 needs_data=False),
    ]
    return {s.name: s for s in specs}


TASK_NAMES = ("vqav2", "gqa", "scienceqa_img", "textvqa", "pope", "mme", "mmbench", "mmvet", "shapes")


def get_task(name: str) -> TaskSpec:
    return _registry()[name]
