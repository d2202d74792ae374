"""Kernel timings at the Mamba-2.8B shapes (d 5120, n 16, r 160, D 2560): our Triton kernels and,
where installed, the peer kernels of mamba-ssm / causal-conv1d on the same inputs.

``--sweep`` also times each kernel's configurations (the scan's chunked, "seq" and "channel"
variants and block sizes, also at 4 and 8 sequences, where the step loops cross over; the
conv's channel blocks and segment lengths; the GEMVs' and mixer_in's tiles and split-K), which
is how their defaults were chosen; only defaults go into the table.

    python -m benchmarks.kernels [--sweep] [--only scan conv step linear mixer_in] [--out JSON] [--doc FILE]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine, markdown_table, write_json, write_section

D_IN, N, R, D_MODEL = 5120, 16, 160, 2560


def bench(fn) -> float:
    """Median milliseconds of fn, replayed from a CUDA graph so that launch overhead on the host
    does not hide short kernels (triton's do_bench_cudagraph); eagerly where fn cannot be captured."""
    from triton.testing import do_bench, do_bench_cudagraph

    fn()  # compile / autotune outside the capture
    try:
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception:  # noqa: BLE001 - e.g. a peer kernel that syncs with the host
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=50, return_mode="median")


def weight_copies(*weights, total_bytes: float = 256e6) -> list[tuple]:
    """Enough copies of a kernel's weights to exceed the L2 cache several times over: timing a
    replay that cycles through them reads weights from HBM, as the model's decode step does
    (each layer's weights once per token), instead of from L2."""
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    copies = max(1, -(-int(total_bytes) // nbytes))
    return [weights] + [tuple(w.clone() for w in weights) for _ in range(copies - 1)]


def bench_cold(fn, copies: list[tuple]) -> float:
    """Milliseconds per call of fn(*weights), cycling through the weight copies."""
    return bench(lambda: [fn(*ws) for ws in copies]) / len(copies)


def scan_inputs(b, l, g):
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    xz = r(b, l, 2 * D_IN).bfloat16()
    u, z = xz[..., :D_IN].transpose(1, 2), xz[..., D_IN:].transpose(1, 2)  # channel-last, as in the mixer
    delta = (r(b, l, D_IN) * 0.5 - 2).bfloat16().transpose(1, 2)
    BC = r(b, l, 2 * N).bfloat16()
    return u, delta, -torch.exp(r(D_IN, N) * 0.5), BC[..., :N].transpose(1, 2), BC[..., N:].transpose(1, 2), \
        r(D_IN), z, r(D_IN) * 0.1


def scan_rows(sweep: bool) -> list[dict]:
    from kernels.triton.selective_scan import selective_scan_triton

    rows, g = [], torch.Generator(device="cuda").manual_seed(0)
    for b, l in [(1, 768), (16, 768)] + ([(4, 768), (8, 768), (64, 768)] if sweep else []):
        u, delta, A, B, C, Dv, z, bias = scan_inputs(b, l, g)
        pool, idx = torch.zeros(b, D_IN, N, device="cuda"), torch.arange(b, device="cuda")
        configs = [None]
        if sweep:
            configs += [("chunked", bd, t, w) for bd, t, w in [(32, 16, 4), (8, 16, 4), (16, 16, 4), (8, 32, 4),
                                                               (16, 8, 4), (16, 16, 8), (4, 32, 4)]]
            configs += [("seq", bd, t, w) for bd, t, w in [(32, 8, 4), (64, 8, 4), (16, 8, 2), (32, 4, 2),
                                                           (64, 4, 4), (128, 8, 4), (32, 16, 4), (64, 16, 8)]]
            configs += [("channel", bd, t, w, r) for bd, t, w, r in [(32, 8, 1, 96), (128, 8, 4, 96), (64, 4, 2, 96),
                                                                     (64, 16, 2, 128), (64, 8, 2, None),
                                                                     (64, 8, 2, 80), (64, 8, 2, 88), (64, 8, 2, 104)]]
        for cfg in configs:
            ms = bench(lambda: selective_scan_triton(u, delta, A, B, C, Dv, z, bias, True, state=pool,
                                                     state_indices=idx, config=cfg))
            rows.append({"kernel": "selective_scan", "impl": "triton", "config": cfg, "shape": [b, l], "ms": ms})
        peer = _peer("mamba_ssm.ops.selective_scan_interface")
        if peer is not None:  # mamba-ssm wants (b, d, l) contiguous inputs: its callers transpose first
            uc, dc, zc, Bc, Cc = (t.contiguous() for t in (u, delta, z, B, C))
            ms = bench(lambda: peer.selective_scan_fn(uc, dc, A, Bc, Cc, Dv, zc, bias, True, return_last_state=True))
            rows.append({"kernel": "selective_scan", "impl": "mamba-ssm", "config": None, "shape": [b, l], "ms": ms})
    return rows


def conv_rows(sweep: bool) -> list[dict]:
    from kernels.triton.causal_conv1d import causal_conv1d_triton

    rows, g = [], torch.Generator(device="cuda").manual_seed(1)
    for b, l in [(1, 768), (16, 768)]:
        x = torch.randn(b, l, 2 * D_IN, device="cuda", generator=g).bfloat16()[..., :D_IN].transpose(1, 2)
        w, cb = torch.randn(D_IN, 4, device="cuda").bfloat16(), torch.randn(D_IN, device="cuda").bfloat16()
        pool, idx = torch.zeros(b, D_IN, 3, device="cuda").bfloat16(), torch.arange(b, device="cuda")
        configs = [None] + ([(bd, seg, nw) for bd in (256, 512, 1024) for seg in (16, 32, 64, 128) for nw in (2, 4, 8)]
                            if sweep else [])
        for cfg in configs:
            ms = bench(lambda: causal_conv1d_triton(x, w, cb, "silu", conv_state=pool, state_indices=idx, config=cfg))
            rows.append({"kernel": "causal_conv1d", "impl": "triton", "config": cfg, "shape": [b, l], "ms": ms})
        peer = _peer("causal_conv1d")
        if peer is not None:
            xc = x.contiguous()
            ms = bench(lambda: peer.causal_conv1d_fn(xc, w, cb, activation="silu"))
            rows.append({"kernel": "causal_conv1d", "impl": "causal-conv1d", "shape": [b, l], "ms": ms})
    return rows


def step_rows() -> list[dict]:
    from kernels import add_rms_norm, causal_conv1d_update, selective_state_update

    rows, g = [], torch.Generator(device="cuda").manual_seed(2)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    for b in (1, 64, 256):
        xz, xproj = r(b, 2 * D_IN).bfloat16(), r(b, R + 2 * N).bfloat16()
        x, z = xz[:, :D_IN], xz[:, D_IN:]
        dt_low, B, C = xproj.split([R, N, N], dim=-1)
        W, A_log, Dv, bias = (r(D_IN, R) * 0.05).bfloat16(), r(D_IN, N) * 0.5, r(D_IN), r(D_IN).bfloat16()
        dt = (r(b, D_IN) * 0.5).bfloat16()
        pool, idx = r(b, D_IN, N), torch.arange(b, device="cuda")
        cpool, w = r(b, D_IN, 3).bfloat16(), r(D_IN, 4).bfloat16()
        h, res, nw = r(b, D_MODEL).bfloat16(), r(b, D_MODEL), torch.ones(D_MODEL, device="cuda", dtype=torch.bfloat16)
        cases = {
            "selective_state_update": lambda: selective_state_update(pool, x, dt, A_log, B, C, Dv, z, bias, True, idx,
                                                                     A_is_log=True, backend="triton"),
            "selective_state_update+dt_proj": lambda: selective_state_update(pool, x, dt_low, A_log, B, C, Dv, z, bias,
                                                                             True, idx, W, True, backend="triton"),
            "causal_conv1d_update": lambda: causal_conv1d_update(x, cpool, w, None, "silu", idx, backend="triton"),
            "add_rms_norm": lambda: add_rms_norm(h, res, nw, backend="triton"),
        }
        for name, fn in cases.items():
            rows.append({"kernel": name, "impl": "triton", "shape": [b], "ms": bench(fn)})
        peer = _peer("mamba_ssm.ops.triton.selective_state_update")
        if peer is not None:
            A = -torch.exp(A_log)
            ms = bench(lambda: peer.selective_state_update(pool, x, dt, A, B, C, Dv, z=z, dt_bias=bias,
                                                           dt_softplus=True, state_batch_indices=idx))
            rows.append({"kernel": "selective_state_update", "impl": "mamba-ssm", "shape": [b], "ms": ms})
    return rows


def linear_rows(sweep: bool) -> list[dict]:
    """The decode step's projections at a few rows: our Triton GEMV vs cuBLAS (torch's F.linear)."""
    from kernels.triton.linear import linear_accumulate_triton, small_linear_triton

    rows, g = [], torch.Generator(device="cuda").manual_seed(3)
    shapes = {"in_proj": (2 * D_IN, D_MODEL), "x_proj": (R + 2 * N, D_IN), "out_proj": (D_MODEL, D_IN),
              "lm_head": (50280, D_MODEL)}
    configs = [None] + ([(bn, bk, st, w) for bn in (16, 32, 64) for bk in (128, 256) for st, w in ((3, 4), (4, 4))]
                        if sweep else [])
    for m in (1, 8):
        for name, (n, k) in shapes.items():
            if sweep and name in ("x_proj", "lm_head"):
                continue
            x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
            w = torch.randn(n, k, device="cuda", generator=g).bfloat16()
            gb = n * k * 2 / 1e9
            ws = weight_copies(w)
            ms = bench_cold(lambda w: torch.nn.functional.linear(x, w), ws)
            rows.append({"kernel": f"linear {name}", "impl": "cuBLAS", "shape": [m, n, k], "ms": ms, "TB/s": gb / ms})
            for cfg in configs:
                ms = bench_cold(lambda w: small_linear_triton(x, w, config=cfg), ws)
                rows.append({"kernel": f"linear {name}", "impl": "triton", "config": cfg, "shape": [m, n, k],
                             "ms": ms, "TB/s": gb / ms})
            if name != "out_proj":
                continue
            out = torch.zeros(m, n, device="cuda")
            for split in (2, 4, 8) if sweep else (4,):
                for cfg in [None] + ([(16, 256, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4), (32, 64, 4, 4),
                                      (32, 256, 3, 4), (64, 128, 3, 8), (64, 64, 4, 4)] if sweep else []):
                    ms = bench_cold(lambda w: linear_accumulate_triton(x, w, out, split, cfg), ws)
                    rows.append({"kernel": "linear_accumulate out_proj", "impl": "triton",
                                 "config": None if split == 4 and cfg is None else [split, cfg], "shape": [m, n, k],
                                 "ms": ms, "TB/s": gb / ms})
    rows += wide_narrow_rows(sweep)
    return rows


def wide_narrow_rows(sweep: bool) -> list[dict]:
    """The narrow projections of the decode step past 16 rows, where it runs unfused: x_proj
    (192 features) summed into float32 by the split-K kernel, and dt_proj (k = 160) from those
    float32 sums, against cuBLAS on 16-bit inputs; ``sweep`` adds the split and tile choices."""
    from kernels.triton.linear import linear_accumulate_triton, small_linear_triton

    rows, g = [], torch.Generator(device="cuda").manual_seed(5)
    for m in (32, 64, 128, 256):
        for name, (n, k) in {"x_proj": (R + 2 * N, D_IN), "dt_proj": (D_IN, R)}.items():
            x = torch.randn(m, k, device="cuda", generator=g)
            xb, w = x.bfloat16(), (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
            gb, ws = n * k * 2 / 1e9, weight_copies(w)
            ms = bench_cold(lambda w: torch.nn.functional.linear(xb, w), ws)
            rows.append({"kernel": f"linear {name}", "impl": "cuBLAS", "shape": [m, n, k], "ms": ms, "TB/s": gb / ms})
            if name == "dt_proj":
                for cfg in [None] + ([(bn, bk, 4, 4) for bn in (64, 128) for bk in (32, 64)] if sweep else []):
                    ms = bench_cold(lambda w: small_linear_triton(x, w, config=cfg), ws)
                    rows.append({"kernel": f"linear {name}", "impl": "triton (float32 in)", "config": cfg,
                                 "shape": [m, n, k], "ms": ms, "TB/s": gb / ms})
                continue
            out = torch.zeros(m, n, device="cuda")
            for split in [None] + ([8, 16, 32, 40] if sweep else []):
                for cfg in [None] + ([(bn, bk, 4, 4) for bn in (64, 256) for bk in (64, 128)] if sweep else []):
                    ms = bench_cold(lambda w: linear_accumulate_triton(xb, w, out, split, cfg), ws)
                    rows.append({"kernel": f"linear_accumulate {name}", "impl": "triton",
                                 "config": None if split is None and cfg is None else [split, cfg],
                                 "shape": [m, n, k], "ms": ms, "TB/s": gb / ms})
    return rows


def mixer_in_rows(sweep: bool) -> list[dict]:
    """The fused in_proj + conv update + x_proj of the decode step against the three kernels it replaces."""
    from kernels import causal_conv1d_update, small_linear
    from kernels.triton.decode import mixer_in_triton

    rows, g = [], torch.Generator(device="cuda").manual_seed(4)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    for m in (1, 4, 16):
        normed = r(m, D_MODEL).bfloat16()
        w_in, w_x = (r(2 * D_IN, D_MODEL) * 0.02).bfloat16(), (r(R + 2 * N, D_IN) * 0.02).bfloat16()
        pool, cw, cb = r(m, D_IN, 3).bfloat16(), r(D_IN, 4).bfloat16(), r(D_IN).bfloat16()
        idx, xp = torch.arange(m, device="cuda"), torch.zeros(m, R + 2 * N, device="cuda")
        gb = (w_in.numel() + w_x.numel()) * 2 / 1e9
        ws = weight_copies(w_in, w_x)

        def unfused(w_in, w_x):
            x, z = torch.nn.functional.linear(normed, w_in).chunk(2, dim=-1)
            x = causal_conv1d_update(x, pool, cw, cb, "silu", idx, backend="triton")
            return small_linear(x, w_x, backend="cuda"), z

        ms = bench_cold(unfused, ws)
        rows.append({"kernel": "in_proj+conv+x_proj", "impl": "3 kernels", "shape": [m], "ms": ms, "TB/s": gb / ms})
        for cfg in [None] + ([(bn, bk, st, w_) for bn in (16, 32, 64) for bk in (64, 128, 256) for st, w_ in
                              ((3, 4), (4, 4), (4, 8))] if sweep and m != 4 else []):
            # Back to back on one pool, so the early reads of the conv windows race with the call
            # before: the values are meaningless, the timing is not (the model runs its norm between).
            ms = bench_cold(lambda w_in, w_x: mixer_in_triton(normed, w_in, pool, cw, cb, idx, w_x, xp, cfg), ws)
            rows.append({"kernel": "in_proj+conv+x_proj", "impl": "triton mixer_in", "config": cfg, "shape": [m],
                         "ms": ms, "TB/s": gb / ms})
    return rows


def _peer(name):
    try:
        return __import__("importlib").import_module(name)
    except ImportError:
        return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="also time every kernel's configurations (JSON only)")
    ap.add_argument("--only", nargs="*", default=["scan", "conv", "step", "linear", "mixer_in"],
                    help="kernel groups to time")
    ap.add_argument("--out", default=None)
    ap.add_argument("--doc", default=None, help="markdown file for the table ('' for none)")
    args = ap.parse_args(argv)
    groups = {"scan": lambda: scan_rows(args.sweep), "conv": lambda: conv_rows(args.sweep), "step": step_rows,
              "linear": lambda: linear_rows(args.sweep), "mixer_in": lambda: mixer_in_rows(args.sweep)}
    rows = [row for name in args.only for row in groups[name]()]
    result = {"benchmark": "kernels", "machine": machine("cuda"), "rows": rows}
    table = markdown_table(["kernel", "impl", "config", "shape", "ms", "weight TB/s"],
                           [[r["kernel"], r["impl"], str(r.get("config") or "default"), str(r["shape"]), r["ms"],
                             r.get("TB/s")] for r in rows if r.get("config") is None])
    m = result["machine"]
    result["table"] = (f"Machine: {m['gpu']}, torch {m['torch']}, triton {m.get('triton')}, {m['date']}. Each kernel is "
                       f"replayed from a CUDA graph. The projections cycle through copies of their weights "
                       f"totalling at least 256 MB, so weights come from HBM as in the model's decode step "
                       f"(which reads each layer's weights once per token), not from the 50 MB L2 cache; "
                       f"weight TB/s is weight bytes over time.\n\n{table}")
    write_json(result, args.out)
    if args.doc:
        write_section("kernels", "## Kernels at the 2.8B shapes\n\n" + result["table"], args.doc)
    return result


if __name__ == "__main__":
    main()
