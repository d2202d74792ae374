"""Benchmark evaluation against any OpenAI-compatible server: ``vlmamba eval`` (see docs/eval.md).

Only argparse is imported here; the evaluator itself loads when the command runs."""

from __future__ import annotations

import argparse

TASK_HELP = {
    "vqav2": "VQAv2: VQA accuracy (paper 76.6)",
    "gqa": "GQA: exact match (paper 56.2)",
    "scienceqa_img": "ScienceQA, questions with an image: multiple-choice accuracy (paper 65.4)",
    "textvqa": "TextVQA: VQA accuracy (paper 48.9)",
    "pope": "POPE: yes/no F1, accuracy, precision, recall per split (paper 84.4 F1)",
    "mme": "MME: perception and cognition scores (paper 1369.6 perception)",
    "mmbench": "MMBench: CircularEval accuracy (paper 57.0)",
    "mmvet": "MM-Vet: graded by an LLM judge, needs --judge-url (paper 32.6)",
    "shapes": "this project's Shapes-VQA test split, generated on the fly (no --data)",
}

EXAMPLES = """\
tasks:
{tasks}

examples:
  vlmamba serve &                                   # the demo model on http://127.0.0.1:8000
  vlmamba eval --server http://127.0.0.1:8000 --task shapes --limit 50
  vlmamba eval --server http://127.0.0.1:8000 --task pope --data ~/data/pope --concurrency 16
  vlmamba eval --server http://gpu-box:8000 --task mmvet --data ~/data/mm-vet \\
      --judge-url https://api.openai.com/v1 --judge-model gpt-4o-mini --judge-api-key $OPENAI_API_KEY

Answers are appended to --out as they arrive; running the same command again asks only the questions that
have no answer yet (after an interruption or failed requests) and then prints the scores.
Exit code: 0 done, 1 some requests failed (run again to retry them), 2 bad arguments or data.
docs/eval.md describes each benchmark's expected files.
"""


def _at_least(minimum: int):
    """An argparse type: a whole number no smaller than ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive, _non_negative = _at_least(1), _at_least(0)


def add_eval_parser(subparsers) -> None:
    """Add the ``eval`` subcommand to ``vlmamba``'s subparsers; its ``func`` returns the exit code."""
    e = subparsers.add_parser(
        "eval", help="score a running server on a benchmark (VQAv2, GQA, POPE, MME, MMBench, ...)",
        description="Ask an OpenAI-compatible server (this project's `vlmamba serve`, vLLM, ...) every question "
                    "of a vision-language benchmark, with greedy decoding and images sent inline as data: URLs, "
                    "then score the answers with the benchmark's official metric and print them next to the "
                    "numbers of the VL-Mamba paper.",
        epilog=EXAMPLES.format(tasks="\n".join(f"  {k:<14} {v}" for k, v in TASK_HELP.items())),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--server", required=True, metavar="URL",
                   help="the server's address, e.g. http://127.0.0.1:8000 (a trailing /v1 is optional)")
    e.add_argument("--task", required=True, choices=list(TASK_HELP), metavar="TASK",
                   help="benchmark to run: " + ", ".join(TASK_HELP) + " (details below)")
    e.add_argument("--data", metavar="DIR",
                   help="the benchmark's folder (or its question file) as downloaded; docs/eval.md shows the "
                        "layout per task. Not needed for --task shapes")
    e.add_argument("--questions", metavar="FILE",
                   help="use this question file instead of looking for one in --data (e.g. a LLaVA .jsonl)")
    e.add_argument("--annotations", metavar="FILE",
                   help="VQAv2/TextVQA/GQA: the file with the right answers, if not found in --data")
    e.add_argument("--images", metavar="DIR", help="folder with the images, if not where --data has them")
    e.add_argument("--split", metavar="NAME",
                   help="pope: only this split (random, popular, adversarial; default all); scienceqa_img: "
                        "problems.json split (default test); shapes: test or val (default test)")
    e.add_argument("--limit", type=_positive, metavar="N",
                   help="only the first N questions, for a quick check (per POPE split and MME subtask; an MME "
                        "image's two questions and an MMBench question's rotations count as one; shapes: N "
                        "images, default 500)")
    e.add_argument("--concurrency", type=_positive, default=8, metavar="C",
                   help="requests in flight at once (default 8; raise it for big GPU servers)")
    e.add_argument("--out", metavar="FILE",
                   help="predictions file, JSON lines, one per answer (default eval-results/TASK.jsonl); an "
                        "existing file is resumed: answered questions are not asked again")
    e.add_argument("--summary", metavar="FILE",
                   help="where to write the scores as JSON (default: next to --out, as TASK.summary.json)")
    e.add_argument("--api-key", metavar="KEY", help="bearer key, if the server was started with --api-key")
    e.add_argument("--model", metavar="NAME",
                   help="model name to send (default: the first model the server lists at /v1/models)")
    e.add_argument("--prompt-suffix", metavar="TEXT",
                   help="text appended to every question; \\n means a newline. Default: LLaVA-1.5's, e.g. "
                        "'\\nAnswer the question using a single word or phrase.'; \"\" sends the bare question")
    e.add_argument("--prompt-template", metavar="TEXT",
                   help="how the question is laid out before the suffix, with {question}, {options} (multiple "
                        "choice: 'A. ...' lines) and {context} (hint); default '{question}', or "
                        "'{context}{question}\\n{options}' for scienceqa_img and mmbench")
    e.add_argument("--max-tokens", type=_positive, metavar="N",
                   help="longest answer in tokens (default 16; mmvet 256; shapes 64)")
    e.add_argument("--timeout", type=float, default=300.0, metavar="S", help="seconds per request (default 300)")
    e.add_argument("--max-retries", type=_non_negative, default=8, metavar="N",
                   help="retries of a request answered 429/502/503/504 or cut off, waiting as the server's "
                        "Retry-After says (default 8)")
    e.add_argument("--judge-url", metavar="URL",
                   help="mmvet: an OpenAI-compatible server whose model grades the answers (e.g. "
                        "https://api.openai.com/v1); without it mmvet is skipped")
    e.add_argument("--judge-model", metavar="NAME",
                   help="mmvet: the grading model (default: the first model the judge server lists)")
    e.add_argument("--judge-api-key", metavar="KEY", help="mmvet: bearer key for --judge-url")
    e.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from server.evaluation.runner import run

    return run(args)
