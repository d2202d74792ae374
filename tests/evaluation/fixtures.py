"""Tiny benchmark folders in each task's real file format, with Shapes-VQA images and questions.

The demo model answers every Shapes question exactly when it is sent verbatim (no suffix), so each fixture's
expected score follows from the ground truths written here; a few of them are deliberately wrong. Images are
PNG files named as the benchmark names them (the evaluator also finds them by name without extension)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from model.data.shapes import make_sample

LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."


def qa(i: int, qtype: str):
    return next(q for q in make_sample("test", i).qas if q.qtype == qtype)


def save(i: int, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_sample("test", i).image().save(path, format="PNG")
    return path.name


def png_b64(i: int) -> str:
    buf = io.BytesIO()
    make_sample("test", i).image().save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# (sample, question type, the 10 human answers, answer type); the model says qa(sample, qtype).answer
VQAV2 = [
    (1, "count", ["3"] * 10, "number"),                      # 1.0
    (1, "color", ["purple"] * 2 + ["violet"] * 8, "other"),  # 2 of 10 match: 0.6
    (3, "exists", ["no"] * 10, "yes/no"),                    # 0.0 (the model says yes)
    (4, "count", ["two"] * 3 + ["3"] * 7, "number"),         # "two" == "2", 3 of 10 match: 0.9
]
VQAV2_ACCURACY = 62.5  # (1 + 0.6 + 0 + 0.9) / 4


def vqav2(root: Path) -> Path:
    questions, annotations, llava = [], [], []
    for n, (i, qtype, answers, atype) in enumerate(VQAV2):
        iid, qid = 1000 + i, 500 + n
        name = save(i, root / "val2014" / f"COCO_val2014_{iid:012d}.png")
        questions.append({"image_id": iid, "question": qa(i, qtype).question, "question_id": qid})
        annotations.append({"question_id": qid, "image_id": iid, "answer_type": atype, "question_type": "what",
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                        for k, a in enumerate(answers)], "multiple_choice_answer": answers[0]})
        llava.append({"question_id": qid, "image": name, "text": qa(i, qtype).question + LLAVA_SUFFIX,
                      "category": "default"})
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"data_subtype": "val2014", "task_type": "Open-Ended", "questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(
        {"data_subtype": "val2014", "annotations": annotations}))
    (root / "llava").mkdir()
    (root / "llava" / "llava_vqav2_mscoco_val2014.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava))
    return root


TEXTVQA = [
    (5, "color", ["Orange"] * 10),          # 1.0 (case)
    (2, "count", ["one."] + ["2"] * 9),     # "one." == "1": 1 of 10 matches: 0.3
    (0, "where", ["top left"] * 10),        # 0.0
]
TEXTVQA_ACCURACY = 43.33  # 1.3 / 3


def textvqa(root: Path) -> Path:
    data = []
    for n, (i, qtype, answers) in enumerate(TEXTVQA):
        save(i, root / "train_images" / f"img{i:04d}.png")
        data.append({"question_id": 34000 + n, "image_id": f"img{i:04d}", "question": qa(i, qtype).question,
                     "answers": answers, "set_name": "val"})
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    return root


GQA = [  # (sample, qtype, answer, structural type)
    ("g1", 6, "color", "red", "query"),
    ("g2", 7, "count", "3", "query"),
    ("g3", 8, "exists", "Yes", "verify"),       # right after normalization (the model says "yes")
    ("g4", 9, "where", "top", "query"),         # wrong: the model says "bottom"
]


def gqa(root: Path) -> Path:
    entries = {}
    for qid, i, qtype, answer, kind in GQA:
        save(i, root / "images" / f"n{i}.png")
        entries[qid] = {"imageId": f"n{i}", "question": qa(i, qtype).question, "answer": answer,
                        "fullAnswer": answer, "types": {"structural": kind, "semantic": "attr"}}
    (root / "testdev_balanced_questions.json").write_text(json.dumps(entries))
    return root


def scienceqa(root: Path) -> Path:
    def problem(i, qtype, choices, answer, image=True, split="test", subject="natural science"):
        return {"question": qa(i, qtype).question, "choices": choices, "answer": answer, "hint": "",
                "image": "image.png" if image else None, "split": split, "subject": subject}

    problems = {
        "10": problem(0, "color", ["red", "blue"], 1),                          # says "blue" = B: right
        "11": problem(1, "count", ["2", "3", "4"], 1),                          # says "3" = B: right
        "12": problem(3, "exists", ["yes", "no"], 1, subject="social science"),  # says "yes" = A: wrong
        "13": problem(4, "count", ["2", "3"], 0, image=False),                  # no image: not asked
        "14": problem(5, "count", ["1", "2"], 0, split="train"),                # train split: not asked
    }
    for pid, i in (("10", 0), ("11", 1), ("12", 3), ("14", 5)):
        save(i, root / problems[pid]["split"] / pid / "image.png")
    (root / "problems.json").write_text(json.dumps(problems))
    return root


POPE = {  # split: [(sample, question, label)]; the model's answers are in the comments
    "random": [(1, "Is there a blue triangle?", "yes"),     # yes: TP
               (0, "Is there a orange circle?", "no"),      # no: TN
               (3, "Is there a blue square?", "no")],       # yes: FP
    "popular": [(2, "Is there a red square?", "yes"),       # no: FN
                (5, "Is there a orange triangle?", "yes")],  # yes: TP
    "adversarial": [(6, "Is there a red square?", "yes"),   # yes: TP
                    (7, "Is there a red triangle?", "no")],  # no: TN
}


def pope(root: Path) -> Path:
    for split, rows in POPE.items():
        lines = []
        for n, (i, question, label) in enumerate(rows):
            name = save(i, root / "val2014" / f"COCO_val2014_{2000 + i:012d}.png")
            lines.append(json.dumps({"question_id": n + 1, "image": name, "text": question, "label": label}))
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    return root


MME = {  # subtask: (folder style, {image: (sample, [(question, answer)])})
    "existence": ("nested", {"e1": (1, [("Is there a blue triangle?", "Yes"), ("Is there a green square?", "No")]),
                             "e2": (3, [("Is there a blue square?", "Yes"), ("Is there a red circle?", "Yes")])}),
    "count": ("flat", {"c1": (0, [("How many shapes are there?", "Yes"), ("Is there a blue circle?", "Yes")])}),
    "commonsense_reasoning": ("flat", {"r1": (2, [("Is there a red square?", "No"),
                                                  ("Is there a green circle?", "No")])}),
}


def mme(root: Path) -> Path:
    base = root / "MME_Benchmark_release_version"
    for sub, (style, images) in MME.items():
        for name, (i, pairs) in images.items():
            img_dir, txt_dir = ((base / sub / "images", base / sub / "questions_answers_YN") if style == "nested"
                                else (base / sub, base / sub))
            save(i, img_dir / f"{name}.png")
            txt_dir.mkdir(parents=True, exist_ok=True)
            (txt_dir / f"{name}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pairs))
    return root


MMBENCH = [  # index, sample, qtype, options, answer, category, image reference
    (1, 4, "color", ["red", "blue", "green"], "A", "color", None),   # says "red": right in all 3 rotations
    (2, 8, "count", ["1", "2", "3", "4"], "B", "count", None),      # says "2": right in all 4
    (3, 3, "exists", ["no", "maybe"], "A", "exists", None),          # says "yes": names no option, wrong
    (4, 4, "count", ["2", "3"], "A", "count", "1"),                  # image of row 1; says "2": right
]


def mmbench(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "mmbench_dev_en.tsv"
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "split"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        for index, i, qtype, options, answer, category, ref in MMBENCH:
            opts = (options + [""] * 4)[:4]
            w.writerow([index, qa(i, qtype).question, "nan", *opts, answer, category, ref or png_b64(i), "shapes",
                        "dev"])
    return path


MMVET = {  # id: (sample, qtype, ground truth, capabilities)
    "v1_0": (4, "color", "red", ["rec"]),                # right
    "v1_1": (0, "where", "top left", ["rec", "spat"]),   # wrong (the model says "bottom right")
    "v1_2": (1, "count", "3", ["ocr"]),                   # right
}


def mmvet(root: Path) -> Path:
    data = {}
    for qid, (i, qtype, answer, caps) in MMVET.items():
        save(i, root / "images" / f"{qid}.png")
        data[qid] = {"imagename": f"{qid}.png", "capability": caps, "question": qa(i, qtype).question,
                     "answer": answer}
    (root / "mm-vet.json").write_text(json.dumps(data))
    return root
