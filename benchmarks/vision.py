"""Image encoding throughput: a SigLIP-SO400M-shaped tower (384 px, patch 14, 729 patches) and the
connector, random weights, at batch 1-64.

Times the tower alone, the connector alone and both together (what the engine runs per batch of
new images), in the model dtype (bf16 on CUDA) with SDPA attention, after a warm-up at each batch.

    python -m benchmarks.vision [--checkpoint model/configs/vlmamba-2.8b-so400m] [--batches 1 2 4 8 16 32 64]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import PRESET, machine, markdown_table, timed, write_json, write_section


def build(checkpoint, device, dtype, backend):
    from model.checkpoint_vlm import load_config
    from model.connector import Connector
    from model.factory import cast_model
    from model.vision import VisionTower

    cfg = load_config(checkpoint)
    torch.manual_seed(0)
    tower = cast_model(VisionTower(cfg.vision, device=device), dtype).eval()
    with torch.device(device):
        connector = Connector(cfg.connector, backend, device=device)
    connector.init_weights()
    return cfg, tower, cast_model(connector, dtype).eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(PRESET), help="checkpoint or preset directory (its config.json)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="auto", help="kernel backend of the connector's VSS layer")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="JSON file")
    ap.add_argument("--doc", default=None, help="markdown file (default docs/performance.md on CUDA; '' for none)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg, tower, connector = build(args.checkpoint, device, dtype, args.backend)
    size = cfg.vision.hf_config["image_size"]
    rows = []
    with torch.inference_mode():
        for b in args.batches:
            pix = torch.randn(b, 3, size, size, device=device)
            feats = tower(pix)
            both = lambda: connector(tower(pix).to(dtype))
            only_tower, only_conn = lambda: tower(pix), lambda: connector(feats.to(dtype))
            for fn in (both, only_tower, only_conn):
                fn()  # warm-up at this batch
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t_both, out = timed(both, device, args.repeats)
            t_tower, _ = timed(only_tower, device, args.repeats)
            t_conn, _ = timed(only_conn, device, args.repeats)
            assert out.shape == (b, cfg.vision.num_patches, cfg.connector.llm_dim), out.shape
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows.append({"batch": b, "images_per_s": b / t_both, "ms_per_batch": t_both * 1e3,
                         "tower_ms": t_tower * 1e3, "connector_ms": t_conn * 1e3, "peak_gib": peak})
            print(rows[-1], flush=True)
    m = machine(device)
    params = sum(p.numel() for p in tower.parameters()) / 1e6, sum(p.numel() for p in connector.parameters()) / 1e6
    table = markdown_table(["batch", "images/s", "ms / batch", "tower ms", "connector ms", "peak GiB"],
                           [[r["batch"], r["images_per_s"], r["ms_per_batch"], r["tower_ms"], r["connector_ms"],
                             r["peak_gib"]] for r in rows])
    text = (f"Machine: {m.get('gpu') or 'CPU'}, torch {m['torch']}, {m['date']}. Tower: {cfg.vision.kind}, "
            f"{size} px, patch {cfg.vision.hf_config['patch_size']}, {cfg.vision.num_patches} patches, "
            f"{params[0]:.0f} M parameters, features of layer {cfg.vision.feature_layer}; connector "
            f"`{cfg.connector.kind}`/`{cfg.connector.scan}` ({params[1]:.0f} M). Random {str(dtype)[6:]} weights, "
            f"SDPA attention.\n\n{table}")
    result = {"benchmark": "vision", "machine": m, "rows": rows, "table": text}
    write_json(result, args.out)
    doc = args.doc if args.doc is not None else ("docs/performance.md" if device.type == "cuda" else None)
    write_section("vision", "## Image encoding\n\n" + text, doc or None)
    return result


if __name__ == "__main__":
    main()
