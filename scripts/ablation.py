"""Reproduce the paper's connector / scan ablation at Shapes-VQA scale and write docs/ablation.md.

Every variant trains with the demo recipe at one shared, smaller budget (same seeds, data and
steps), then answers the same test questions. Run on a GPU (about 6 minutes per variant on an
H100, variants can share the GPU with --parallel); on a 2-core CPU it takes many hours.

    python scripts/ablation.py --out runs/ablation            # train + evaluate + write the table
    python scripts/ablation.py --from-json benchmarks/results/ablation   # only rebuild the table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = [("mlp", "bsm"), ("vss_mlp", "bsm"), ("vss_mlp", "csm"), ("vss_l2", "bsm"), ("vss_l2", "csm")]
BUDGET = ["--max-steps", "1500", "--batch-size", "64", "--lr", "1e-3"]
TYPES = ("color", "count", "exists", "where", "describe")


def run_variant(out: Path, connector: str, scan: str, n_eval: int) -> subprocess.Popen:
    name = f"{connector}-{scan}"
    cmd = (f"{sys.executable} -m server.cli --log-level WARNING train --recipe demo --out {out / name} "
           f"--connector {connector} --scan {scan} {' '.join(BUDGET)} --num-workers 3 && "
           f"{sys.executable} -m server.cli --log-level WARNING eval-shapes --checkpoint {out / name} "
           f"--n {n_eval} --json {out / (name + '.json')}")
    return subprocess.Popen(cmd, shell=True)


def table(results: dict[str, dict]) -> str:
    rows = ["| connector | scan | " + " | ".join(TYPES) + " | mean |", "|---" * (len(TYPES) + 3) + "|"]
    for (c, s) in VARIANTS:
        r = results.get(f"{c}-{s}")
        if r is None:
            continue
        accs = [100 * r[t]["accuracy"] for t in TYPES]
        rows.append(f"| {c} | {s} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {sum(accs) / len(accs):.1f} |")
    return "\n".join(rows)


def write_doc(results: dict[str, dict], n_eval: int, path: Path) -> None:
    text = f"""# Connector and scan ablation (Shapes-VQA scale)

The paper (arXiv 2403.13600) compares the MultiModal Connector variants and the
2D scans. This table repeats that comparison on the project's Shapes-VQA task: every variant is
the demo model (SigLIP-style ViT 64 px / patch 8, 4-layer Mamba LM d_model 192), trained from
scratch with the same seed, data and a shared budget smaller than the demo's own
({' '.join(BUDGET)}, i.e. 96 000 conversations), then asked every question of {n_eval} test images
(greedy, exact match, %).

{table(results)}

Made with `python scripts/ablation.py --out runs/ablation` (training on one H100, all variants
sharing the GPU, 2026-11-23); raw results in `benchmarks/results/ablation/`.

What it shows at this budget (one seed; with a few hundred questions per type, differences of a
few points are noise): the VSS connectors beat the plain MLP clearly on `where` and `describe`
(listing every shape in row-major order needs the spatial context the 2D scan mixes in), as the
paper found VSS-based MMCs help; here `vss_mlp` learns fastest and `csm` is no better than
`bsm`, while the paper preferred `vss_l2` with `bsm` at full scale. No variant is converged at
this budget; the full demo budget (4 500 steps of 192) brings `vss_l2` + `bsm` to 99.8-100 %
on every type (docs/demo-model.md).
"""
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="where the variants' checkpoints and results go")
    p.add_argument("--from-json", help="skip training: read NAME.json results from this folder")
    p.add_argument("--n-eval", type=int, default=300, help="test images per variant")
    p.add_argument("--parallel", action="store_true", help="train all variants at once (one GPU is enough)")
    p.add_argument("--doc", default="docs/ablation.md", help="markdown file to write")
    args = p.parse_args(argv)
    folder = Path(args.from_json or args.out)
    if not args.from_json:
        folder.mkdir(parents=True, exist_ok=True)
        procs = []
        for c, s in VARIANTS:
            procs.append(run_variant(folder, c, s, args.n_eval))
            if not args.parallel:
                procs[-1].wait()
        if any(pr.wait() for pr in procs):
            return 1
    results = {f.stem: json.loads(f.read_text()) for f in folder.glob("*.json")}
    write_doc(results, args.n_eval, Path(args.doc))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
