"""``vlmamba eval``: ask a server every question of a benchmark, keep the answers in a resumable JSONL file,
score them and print a summary table next to the paper's numbers."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from server.evaluation.client import ChatClient, Fatal, RequestFailed, answer_text
from server.evaluation.data import DataError, Item, Result, Source, TaskSpec, check_images, limit_items
from server.evaluation.tasks import get_task


class _Fields(dict):
    def __missing__(self, key):  # a template may name a field this task has not: it stays empty
        return ""


def build_prompts(items: list[Item], template: str, suffix: str) -> None:
    for it in items:
        it.prompt = template.format_map(_Fields(it.fields)) + suffix


def read_records(path: Path) -> dict[str, dict]:
    """{qid: merged record} from a predictions file; later lines update earlier ones; broken lines are skipped."""
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # e.g. a line cut short by an interrupted run
            if isinstance(rec, dict) and "qid" in rec:
                merged = records.setdefault(str(rec["qid"]), {})
                if "prediction" in rec:
                    merged.pop("error", None)
                merged.update(rec)
    return records


def paths(args, task: str) -> tuple[Path, Path]:
    out = Path(args.out or f"eval-results/{task}.jsonl")
    summary = Path(args.summary) if args.summary else out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")
    return out, summary


def _suffix(args, spec: TaskSpec) -> str:
    return spec.suffix if args.prompt_suffix is None else args.prompt_suffix.replace("\\n", "\n")


def run(args) -> int:
    """The ``eval`` subcommand. Exit code 0: done; 1: some requests failed or the server refused; 2: bad input."""
    spec = get_task(args.task)
    out, summary_path = paths(args, spec.name)
    if spec.needs_judge and not args.judge_url:
        note = "skipped: needs --judge-url (an OpenAI-compatible server to grade the answers)"
        print(f"{spec.title}: {note}")
        _write_json(summary_path, {"task": spec.name, "title": spec.title, "skipped": note, "metrics": {}})
        return 0
    src = Source(*(Path(p) if p else None for p in (args.data, args.questions, args.annotations, args.images)),
                 split=args.split, limit=args.limit)
    try:
        if spec.needs_data and args.data is None and args.questions is None:
            raise DataError(f"task {spec.name} needs --data (the benchmark's folder; see docs/eval.md)")
        items = limit_items(spec.load(src), args.limit)
        check_images(items, "check --data / --images (docs/eval.md shows the expected layout)")
    except (DataError, OSError, KeyError, ValueError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        print(f"vlmamba eval: {spec.name}: {detail}", file=sys.stderr)
        return 2
    build_prompts(items, args.prompt_template or spec.template, _suffix(args, spec))
    out.parent.mkdir(parents=True, exist_ok=True)
    records = read_records(out)
    _warn_if_changed(items, records, out)
    pending = [it for it in items if "prediction" not in records.get(it.qid, {})]
    model = args.model
    try:
        if pending:
            model = asyncio.run(_ask(args, spec, items, pending, out, records))
        if spec.needs_judge:
            asyncio.run(_judge(args, items, out, records))
    except Fatal as e:
        print(f"vlmamba eval: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nvlmamba eval: interrupted; the answers so far are in {out}: run the same command to go on",
              file=sys.stderr)
        return 130
    result = spec.score(items, records)
    failed = sum("prediction" not in records.get(it.qid, {}) for it in items)
    model = model or next((r["model"] for r in records.values() if r.get("model")), None)
    summary = _summary(args, spec, items, result, failed, model, out)
    print(format_summary(summary))
    _write_json(summary_path, summary)
    if spec.name == "vqav2" and not result.metrics:
        _write_json(out.with_name(out.name.removesuffix(".jsonl") + ".evalai.json"),
                    [{"question_id": int(it.qid) if it.qid.isdigit() else it.qid,
                      "answer": records.get(it.qid, {}).get("prediction", "")} for it in items])
    print(f"predictions: {out}\nsummary: {summary_path}")
    if failed:
        print(f"vlmamba eval: {failed} requests failed (counted wrong); run again to retry them", file=sys.stderr)
    return 1 if failed else 0


def _warn_if_changed(items: list[Item], records: dict[str, dict], out: Path) -> None:
    changed = sum(1 for it in items if records.get(it.qid, {}).get("prompt") not in (None, it.prompt))
    if changed:
        print(f"vlmamba eval: warning: {changed} answers in {out} were given to different prompts; they are kept "
              "(use another --out to ask again)", file=sys.stderr)


async def _ask(args, spec: TaskSpec, items: list[Item], pending: list[Item], out: Path,
               records: dict[str, dict]) -> str:
    async with ChatClient(args.server, args.api_key, args.timeout, args.max_retries) as client:
        listed = await client.models()
        model = args.model or (listed[0] if listed else "default")
        max_tokens = args.max_tokens or spec.max_tokens
        sem = asyncio.Semaphore(max(1, args.concurrency))
        bar = tqdm(total=len(items), initial=len(items) - len(pending), desc=f"eval {spec.name}", unit="q",
                   dynamic_ncols=True)
        fatal: list[Fatal] = []
        with open(out, "a", encoding="utf-8") as f:
            async def one(it: Item) -> None:
                try:
                    content = [{"type": "text", "text": it.prompt}]
                    if it.image is not None:
                        content.insert(0, {"type": "image_url", "image_url": {"url": it.image.data_url()}})
                    body = {"model": model, "messages": [{"role": "user", "content": content}],
                            "temperature": 0, "max_tokens": max_tokens}
                    t0 = time.monotonic()
                    text, reason = answer_text(await client.chat(body))
                    rec = {"qid": it.qid, "prompt": it.prompt, "prediction": text, "model": model,
                           "finish_reason": reason, "seconds": round(time.monotonic() - t0, 3)}
                except Fatal as e:
                    fatal.append(e)
                    return
                except RequestFailed as e:
                    rec = {"qid": it.qid, "prompt": it.prompt, "error": str(e)}
                except Exception as e:  # an unreadable image, a malformed reply ...: this question fails
                    rec = {"qid": it.qid, "prompt": it.prompt, "error": f"{type(e).__name__}: {e}"}
                finally:
                    sem.release()
                records.setdefault(it.qid, {}).update(rec)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                bar.update()

            tasks = []
            for it in pending:
                await sem.acquire()
                if fatal:
                    sem.release()
                    break
                tasks.append(asyncio.create_task(one(it)))
            await asyncio.gather(*tasks)
        bar.close()
        if client.retries:
            print(f"vlmamba eval: {client.retries} retries (server busy)", file=sys.stderr)
    if fatal:
        raise fatal[0]
    return model


async def _judge(args, items: list[Item], out: Path, records: dict[str, dict]) -> None:
    """MM-Vet: grade each answer with the judge model; its scores go into the predictions file too."""
    from server.evaluation.metrics import parse_judge_score
    from server.evaluation.tasks_choice import judge_prompt

    todo = [it for it in items if "prediction" in records.get(it.qid, {}) and "judge_score" not in records[it.qid]]
    if not todo:
        return
    async with ChatClient(args.judge_url, args.judge_api_key, args.timeout, args.max_retries) as judge:
        model = args.judge_model or ((await judge.models()) or ["default"])[0]
        sem = asyncio.Semaphore(max(1, args.concurrency))
        bar = tqdm(total=len(todo), desc="judge", unit="q", dynamic_ncols=True)
        with open(out, "a", encoding="utf-8") as f:
            async def grade(it: Item) -> None:
                async with sem:
                    prompt = judge_prompt(it.fields["question"], it.truth, records[it.qid]["prediction"])
                    rec: dict = {"qid": it.qid, "judge_model": model}
                    for attempt in range(3):  # a reply without a score: ask again, a little less greedily
                        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                                "temperature": 0.2 * attempt, "max_tokens": 32}
                        try:
                            reply, _ = answer_text(await judge.chat(body))
                        except Fatal:
                            raise
                        except RequestFailed as e:
                            rec["judge_error"] = str(e)
                            break
                        rec["judge_reply"] = reply
                        score = parse_judge_score(reply)
                        if score is not None:
                            rec["judge_score"] = score
                            rec.pop("judge_error", None)
                            break
                        rec["judge_error"] = "no score in the reply"
                    records[it.qid].update(rec)
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    bar.update()

            await asyncio.gather(*(grade(it) for it in todo))
        bar.close()


def _summary(args, spec: TaskSpec, items: list[Item], result: Result, failed: int, model, out: Path) -> dict:
    headline = None
    if result.headline is not None:
        headline = {"metric": result.headline, "measured": result.metrics[result.headline], "paper": spec.paper}
    return {"task": spec.name, "title": spec.title, "model": model, "server": args.server, "questions": len(items),
            "scored": result.scored, "failed": failed, "metrics": result.metrics, "headline": headline,
            "breakdown_label": result.breakdown_label, "breakdown": result.breakdown, "notes": result.notes,
            "paper": spec.paper, "predictions": str(out),
            "prompt": {"template": args.prompt_template or spec.template, "suffix": _suffix(args, spec)},
            "max_tokens": args.max_tokens or spec.max_tokens}


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def format_summary(s: dict) -> str:
    """The summary as Markdown tables: the metrics (the paper's number beside the headline) and a breakdown."""
    lines = [f"## {s['title']} ({s['task']}): {s['questions']} requests, {s['failed']} failed, model {s['model']}",
             "", "| metric | measured | VL-Mamba paper |", "|---|---|---|"]
    head = (s.get("headline") or {}).get("metric")
    for name, value in s["metrics"].items():
        paper = s["paper"] if name == head and s["paper"] is not None else ""
        lines.append(f"| {name} | {_fmt(value)} | {paper} |")
    if s["breakdown"]:
        cols = list(dict.fromkeys(c for row in s["breakdown"].values() for c in row))
        lines += ["", f"| {s['breakdown_label']} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |"
                  for name, row in s["breakdown"].items()]
    lines += [f"note: {n}" for n in s["notes"]]
    return "\n".join(lines)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
