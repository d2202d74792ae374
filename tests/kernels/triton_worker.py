"""Run under TRITON_INTERPRET=1 by tests/kernels/test_triton.py: every Triton kernel vs its reference.

Prints one JSON list of {op, case, dtype, errors..., scale}; small shapes keep the interpreter fast.
"""

import json
import sys

import torch

import kernels as K

results = []


def err(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def record(op, case, dtype, **errs):
    results.append({"op": op, "case": case, "dtype": str(dtype), **errs})


def rng(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g)


def state_update_cases():
    # early: the state and constants read before the kernel's wait (the decode step's form).
    for (b, d, n, pool, dtype, early) in [(1, 8, 4, 1, torch.float32, False), (3, 40, 16, 7, torch.float32, False),
                                          (2, 24, 5, 4, torch.bfloat16, False), (4, 16, 16, 9, torch.float16, False),
                                          (7, 40, 16, 11, torch.bfloat16, False), (3, 40, 16, 7, torch.float32, True)]:
        r = rng(b * 100 + d)
        x, dt, z = r(b, d).to(dtype), (r(b, d) * 0.5).to(dtype), r(b, d).to(dtype)
        A, B, C, D, bias = -torch.exp(r(d, n) * 0.5), r(b, n).to(dtype), r(b, n).to(dtype), r(d), r(d) * 0.1
        state = r(pool, d, n)
        idx = torch.randperm(pool)[:b] if pool > b else None
        if idx is None:
            state = state[:b].clone()
        s_ref, s_tri = state.clone(), state.clone()
        y_ref = K.selective_state_update_ref(s_ref, x, dt, A, B, C, D, z, bias, True, state_indices=idx)
        y_tri = K.selective_state_update(s_tri, x, dt, A, B, C, D, z, bias, True, state_indices=idx, early=early,
                                         backend="triton")
        record("selective_state_update", [b, d, n, pool, early], dtype, y_err=err(y_tri, y_ref), state_err=err(s_tri, s_ref),
               y_scale=y_ref.float().abs().max().item(), same_dtype=y_tri.dtype == y_ref.dtype)


def scan_cases():
    # (b, d, n, l, dtype, mode): "pool" = slots + lengths, "init" = initial_state, "plain" = from zeros
    for (b, d, n, l, dtype, mode) in [(2, 40, 16, 37, torch.float32, "pool"), (3, 24, 5, 20, torch.bfloat16, "pool"),
                                      (1, 8, 4, 1, torch.float32, "init"), (2, 16, 16, 18, torch.float16, "plain")]:
        r = rng(b * 10 + l)
        u = r(b, l, 2 * d).to(dtype)[..., :d].transpose(1, 2)  # channel-last view, as the mixer passes it
        z, delta = r(b, d, l).to(dtype), (r(b, d, l) * 0.5).to(dtype)
        A, B, C = -torch.exp(r(d, n) * 0.5), r(b, l, n).to(dtype).transpose(1, 2), r(b, n, l).to(dtype)
        D, bias = r(d), r(d) * 0.1
        kw, pool = {}, None
        if mode == "pool":
            pool, idx = r(b + 3, d, n), torch.randperm(b + 3)[:b]
            lengths = torch.randint(1, l + 1, (b,))
            kw = {"lengths": lengths, "state_indices": idx}
        elif mode == "init":
            kw = {"initial_state": r(b, d, n)}
        outs = []
        for backend in ("ref", "triton"):
            extra = {"state": pool.clone()} if pool is not None else {}
            y, last = K.selective_scan(u, delta, A, B, C, D, z, bias, True, **kw, **extra, backend=backend)
            outs.append((y, last if last is not None else extra["state"]))
        (y_ref, s_ref), (y_tri, s_tri) = outs
        valid = torch.ones(b, 1, l) if mode != "pool" else (torch.arange(l)[None, :] < kw["lengths"][:, None])[:, None]
        record("selective_scan", [b, d, n, l, mode], dtype, y_err=err(y_tri * valid, y_ref * valid),
               state_err=err(s_tri, s_ref), y_scale=y_ref.float().abs().max().item(),
               same_dtype=y_tri.dtype == y_ref.dtype)


def scan_variant_cases():
    """Every prefill-scan kernel ("channel" and "seq" step loops, the chunked scan), forced through
    ``config`` at shapes where the default would pick another; (kind, config, dtype, n, full)
    where ``full`` = pool slots, ragged lengths, D, z and delta bias, else none of them."""
    from kernels.triton.selective_scan import selective_scan_triton

    for kind, cfg, dtype, n, full in [("seq", ("seq", 16, 8, 2), torch.float32, 16, True),
                                      ("seq", ("seq", 32, 4, 2), torch.bfloat16, 16, True),
                                      ("chunked", ("chunked", 8, 16, 4), torch.float32, 16, True),
                                      ("channel", ("channel", 32, 8, 1), torch.float32, 16, True),  # d % 32 != 0
                                      ("channel", ("channel", 64, 4, 2), torch.bfloat16, 5, True),  # n < BLOCK_N
                                      ("channel", ("channel", 8, 8, 1), torch.float16, 16, False)]:  # d % 8 == 0
        b, d, l = 2, 40, 21
        r = rng(len(results))
        u, z, delta = r(b, d, l).to(dtype), r(b, d, l).to(dtype), (r(b, d, l) * 0.5).to(dtype)
        A, B, C, D, bias = -torch.exp(r(d, n) * 0.5), r(b, n, l).to(dtype), r(b, n, l).to(dtype), r(d), r(d) * 0.1
        if full:
            pool, idx, lengths = r(b + 2, d, n), torch.tensor([3, 0]), torch.tensor([21, 9])
            p_ref, p_tri = pool.clone(), pool.clone()
            kw = [dict(lengths=lengths, state=p, state_indices=idx) for p in (p_ref, p_tri)]
            y_ref, _ = K.selective_scan_ref(u, delta, A, B, C, D, z, bias, True, **kw[0])
            y_tri, _ = selective_scan_triton(u, delta, A, B, C, D, z, bias, True, **kw[1], config=cfg)
            valid = (torch.arange(l)[None, :] < lengths[:, None])[:, None]
        else:
            h0 = r(b, d, n)
            y_ref, p_ref = K.selective_scan_ref(u, delta, A, B, C, delta_softplus=True, initial_state=h0)
            y_tri, p_tri = selective_scan_triton(u, delta, A, B, C, delta_softplus=True, initial_state=h0, config=cfg)
            valid = torch.ones(1, 1, l)
        record(f"selective_scan_{kind}", list(cfg) + [n, full], dtype, y_err=err(y_tri * valid, y_ref * valid),
               state_err=err(p_tri, p_ref), y_scale=y_ref.float().abs().max().item(),
               same_dtype=y_tri.dtype == y_ref.dtype)


def conv_cases():
    for (b, d, l, dtype, mode, w_) in [(2, 40, 37, torch.float32, "pool", 4), (3, 24, 2, torch.bfloat16, "pool", 4),
                                       (1, 70, 5, torch.float32, "init", 4), (2, 16, 33, torch.float16, "plain", 4),
                                       (2, 24, 19, torch.float32, "init", 3), (3, 16, 11, torch.bfloat16, "pool", 2)]:
        r = rng(b * 7 + l)
        x = r(b, l, 2 * d).to(dtype)[..., :d].transpose(1, 2)
        w, cb = r(d, w_), r(d)
        kw, pool = {}, None
        if mode == "pool":
            pool, idx = r(b + 2, d, w_ - 1).to(dtype), torch.randperm(b + 2)[:b]
            kw = {"lengths": torch.randint(1, l + 1, (b,)), "state_indices": idx}
        elif mode == "init":
            kw = {"initial_state": r(b, d, w_ - 1).to(dtype)}
        outs = []
        for backend in ("ref", "triton"):
            extra = {"conv_state": pool.clone()} if pool is not None else {}
            y, last = K.causal_conv1d(x, w, cb, "silu", **kw, **extra, backend=backend)
            outs.append((y, last if last is not None else extra["conv_state"]))
        (y_ref, s_ref), (y_tri, s_tri) = outs
        record("causal_conv1d", [b, d, l, mode, w_], dtype, y_err=err(y_tri, y_ref), state_err=err(s_tri, s_ref),
               y_scale=y_ref.float().abs().max().item(), same_dtype=y_tri.dtype == y_ref.dtype)
    for (b, d, pool_n, dtype, w_) in [(1, 8, 1, torch.float32, 4), (3, 300, 6, torch.bfloat16, 4),
                                      (5, 40, 7, torch.float32, 3), (2, 40, 2, torch.float32, 2)]:
        r = rng(b + d)
        x, w, cb = r(b, 2 * d).to(dtype)[:, :d], r(d, w_), r(d)
        pool = r(pool_n, d, w_ - 1).to(dtype)
        idx = torch.randperm(pool_n)[:b] if pool_n > b else None
        p_ref, p_tri = pool.clone(), pool.clone()
        y_ref = K.causal_conv1d_update_ref(x, p_ref, w, cb, "silu", state_indices=idx)
        y_tri = K.causal_conv1d_update(x, p_tri, w, cb, "silu", state_indices=idx, backend="triton")
        record("causal_conv1d_update", [b, d, pool_n], dtype, y_err=err(y_tri, y_ref), state_err=err(p_tri, p_ref),
               y_scale=y_ref.float().abs().max().item(), same_dtype=y_tri.dtype == y_ref.dtype)


def fused_cases():
    """selective_state_update with dt_proj folded in and A given as A_log; add_rms_norm."""
    # early at one row also reads dt_proj's rows as one tile before the wait (16-channel blocks).
    for (b, d, n, r_, dtype, early) in [(2, 40, 16, 5, torch.float32, False), (3, 64, 16, 70, torch.bfloat16, False),
                                        (6, 48, 16, 20, torch.float32, False), (1, 40, 16, 20, torch.float32, True),
                                        (3, 64, 16, 70, torch.bfloat16, True)]:
        r = rng(b * 3 + d)
        xproj = r(b, r_ + 2 * n).to(dtype)
        dt_low, B, C = xproj.split([r_, n, n], dim=-1)  # strided views, as the mixer passes them
        x, z, W = r(b, d).to(dtype), r(b, d).to(dtype), (r(d, r_) * 0.3).to(dtype)
        A_log, D, bias = r(d, n) * 0.5, r(d), r(d) * 0.1
        pool, idx = r(b + 2, d, n), torch.randperm(b + 2)[:b]
        p_ref, p_tri = pool.clone(), pool.clone()
        y_ref = K.selective_state_update_ref(p_ref, x, dt_low, A_log, B, C, D, z, bias, True, idx, W, True)
        y_tri = K.selective_state_update(p_tri, x, dt_low, A_log, B, C, D, z, bias, True, idx, W, True, early,
                                         backend="triton")
        record("selective_state_update_lowrank", [b, d, n, r_, early], dtype, y_err=err(y_tri, y_ref),
               state_err=err(p_tri, p_ref), y_scale=y_ref.float().abs().max().item(),
               same_dtype=y_tri.dtype == y_ref.dtype)
    for (rows, D_, dtype, has_res, fp32) in [(3, 40, torch.float32, False, True), (5, 100, torch.bfloat16, True, True),
                                            (2, 64, torch.float16, True, False)]:
        r = rng(rows + D_)
        x, w = r(rows, D_).to(dtype), (1 + 0.1 * r(D_)).to(dtype)
        res = r(rows, D_) if fp32 else r(rows, D_).to(dtype)
        res = res if has_res else None
        n_ref, r_ref = K.add_rms_norm_ref(x, res, w, 1e-5, fp32)
        n_tri, r_tri = K.add_rms_norm(x, res, w, 1e-5, fp32, backend="triton")
        record("add_rms_norm", [rows, D_, has_res, fp32], dtype, y_err=err(n_tri, n_ref), state_err=err(r_tri, r_ref),
               y_scale=n_ref.float().abs().max().item(), same_dtype=n_tri.dtype == n_ref.dtype == w.dtype
               and r_tri.dtype == r_ref.dtype)


def linear_cases():
    # bf16 dots are checked on the GPU (tests/kernels/test_triton_gpu.py): the interpreter's bf16 dot is wrong.
    # 70 rows take two blocks of rows; float32 rows with 16-bit weights are rounded first (dt_proj
    # reads x_proj's float32 sums so).
    for (m, n, k, dtype, bias, x_dtype) in [(1, 40, 70, torch.float32, True, None), (3, 33, 300, torch.float16, False, None),
                                            (16, 20, 16, torch.float32, True, None), (40, 20, 300, torch.float32, False, None),
                                            (70, 24, 40, torch.float16, True, torch.float32)]:
        r = rng(m * 5 + n)
        x = r(m, 2 * k).to(x_dtype or dtype)[:, :k]  # a strided row view, as the decode step passes x
        w, b = r(n, k).to(dtype), (r(n).to(dtype) if bias else None)
        y_ref, y_tri = K.small_linear_ref(x, w, b), K.small_linear(x, w, b, backend="triton")
        record("small_linear", [m, n, k], dtype, y_err=err(y_tri, y_ref), state_err=0.0,
               y_scale=y_ref.float().abs().max().item(), same_dtype=y_tri.dtype == y_ref.dtype)
    for (m, n, k, dtype, split) in [(1, 40, 70, torch.float32, 3), (3, 33, 300, torch.float16, 4)]:
        r = rng(m * 9 + n)
        x, w, out = r(m, 2 * k).to(dtype)[:, :k], r(n, k).to(dtype), r(m, n)
        from kernels.triton.linear import linear_accumulate_triton

        y_ref = K.linear_accumulate_ref(x, w, out.clone())
        y_tri = linear_accumulate_triton(x, w, out.clone(), split, (16, 32, 2, 4))  # several k slices
        record("linear_accumulate", [m, n, k, split], dtype, y_err=err(y_tri, y_ref), state_err=0.0,
               y_scale=y_ref.float().abs().max().item(), same_dtype=y_tri.dtype == y_ref.dtype)
    # More rows than one block, the slices of k chosen by the kernel, through the dispatcher
    # (x_proj's call in the decode step: no row limit).
    for (m, n, k, dtype) in [(70, 40, 300, torch.float16)]:
        r = rng(m * 9 + n)
        x, w, out = r(m, 2 * k).to(dtype)[:, :k], r(n, k).to(dtype), r(m, n)
        y_ref = K.linear_accumulate_ref(x, w, out.clone())
        y_tri = K.linear_accumulate(x, w, out.clone(), backend="triton", max_rows=None)
        record("linear_accumulate", [m, n, k, None], dtype, y_err=err(y_tri, y_ref), state_err=0.0,
               y_scale=y_ref.float().abs().max().item(), same_dtype=y_tri.dtype == y_ref.dtype)


def mixer_in_cases():
    """The fused in_proj + conv update + x_proj; "state" is the conv pool."""
    # Conv widths 4, 3 and 2: the window tile is padded to a power of two.
    for (b, D_, d, R_, dtype, w) in [(1, 48, 32, 13, torch.float32, 4), (3, 40, 48, 20, torch.float16, 4),
                                     (2, 64, 64, 9, torch.float16, 4), (2, 40, 32, 9, torch.float32, 3),
                                     (3, 40, 32, 9, torch.float32, 2)]:
        r = rng(b * 11 + D_)
        normed, w_in, w_x = r(b, 2 * D_).to(dtype)[:, :D_], (r(2 * d, D_) * 0.2).to(dtype), (r(R_, d) * 0.2).to(dtype)
        pool, idx, cw, cb = r(b + 3, d, w - 1).to(dtype), torch.randperm(b + 3)[:b], r(d, w).to(dtype), r(d).to(dtype)
        outs = []
        for backend in ("ref", "triton"):
            p, xp = pool.clone(), torch.zeros(b, R_)
            x, z = K.mixer_in(normed, w_in, p, cw, cb, idx, w_x, xp, backend=backend)
            outs.append((torch.cat([x, z], 1), p, xp))
        (y_ref, p_ref, x_ref), (y_tri, p_tri, x_tri) = outs
        record("mixer_in", [b, D_, d, R_, w], dtype, y_err=err(y_tri, y_ref), state_err=err(p_tri, p_ref),
               y_scale=y_ref.float().abs().max().item(), same_dtype=y_tri.dtype == y_ref.dtype)
        # x_proj: the reference rounds its product to the input dtype, the kernel keeps fp32 sums.
        record("mixer_in_xproj", [b, D_, d, R_], dtype, y_err=err(x_tri, x_ref), state_err=0.0,
               y_scale=x_ref.abs().max().item(), same_dtype=True)


def mixer_out_cases():
    """The state update with dt_proj fused, then out_proj accumulated, in one kernel: one row
    (products from registers), several (the tensor-core dot), channels not a multiple of the
    block, states stored as bfloat16, no D or dt bias."""
    f32, f16 = torch.float32, torch.float16
    for (b, d, n, r_, E, dtype, sd, block_c, extra) in [
            (1, 64, 16, 6, 40, f32, f32, 32, True), (3, 96, 16, 10, 48, f16, f32, 32, True),
            (2, 40, 8, 4, 33, f32, torch.bfloat16, 16, True), (16, 32, 16, 4, 32, f32, f32, 32, False),
            (1, 48, 4, 5, 24, f16, f32, 32, False)]:
        r = rng(b * 7 + d)
        x, z, xp = r(b, d).to(dtype), r(b, d).to(dtype), r(b, r_ + 2 * n)
        A_log, D, bias = r(d, n) * 0.5, r(d) if extra else None, r(d) * 0.1 if extra else None
        w_dt, w_out = (r(d, r_) * 0.3).to(dtype), (r(E, d) * 0.2).to(dtype)
        pool, idx, out0 = r(b + 3, d, n).to(sd), torch.randperm(b + 3)[:b], r(b, E)
        outs = []
        for backend in ("ref", "triton"):
            p, out = pool.clone(), out0.clone()
            if backend == "triton":
                from kernels.triton import mixer_out_triton

                mixer_out_triton(p, x, z, xp, A_log, D, bias, w_dt, idx, w_out, out, config=(block_c, 16, 2, 4))
            else:
                K.mixer_out(p, x, z, xp, A_log, D, bias, w_dt, idx, w_out, out, backend="ref")
            outs.append((out, p))
        (y_ref, p_ref), (y_tri, p_tri) = outs
        untouched = [i for i in range(b + 3) if i not in idx.tolist()]
        assert torch.equal(p_tri[untouched], pool[untouched]), "slots outside state_indices changed"
        # bfloat16 states: float32 sums summed in another order may round to the neighbouring value.
        one_step = p_ref.float().abs().max().item() * 2 ** -7 if sd == torch.bfloat16 else 0.0
        record("mixer_out", [b, d, n, r_, E, str(sd)], dtype, y_err=err(y_tri, y_ref),
               state_err=max(0.0, err(p_tri, p_ref) - one_step),
               y_scale=y_ref.abs().max().item(), same_dtype=y_tri.dtype == y_ref.dtype)


def fused_step_cases():
    """A tiny LM's decode steps on the fused path equal its parallel prefill: at one and two
    rows with the state update and out_proj in one kernel (mixer_out), at three in two."""
    from model.config import MambaConfig
    from model.mamba import MIXER_OUT_ROWS, MambaLM

    assert MIXER_OUT_ROWS in (1, 2), "the rows below should cover both forms of the fused step"
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for b in (1, 2, 3):
            with torch.no_grad():
                lm = MambaLM(MambaConfig(d_model=32, n_layer=3, vocab_size=100), backend="ref").init_weights(0).to(dtype)
                ids = torch.randint(0, 100, (b, 6))
                full = lm(ids).float()
                state, slots = lm.allocate_state(4), torch.tensor([2, 0, 3][:b])
                lm(ids[:, :3], state=state, slots=slots)
                lm.set_backend("triton")
                assert lm._fuses_step(ids.shape[0], ids.device), "the fused step should run here"
                steps = [lm.step(ids[:, t], state=state, slots=slots).float() for t in range(3, 6)]
            y_err = max(err(s, full[:, t]) for s, t in zip(steps, range(3, 6)))
            record("fused_decode_step", [b, 32, 3], dtype, y_err=y_err, state_err=0.0,
                   y_scale=full.abs().max().item(), same_dtype=True)


def unfused_step_cases():
    """Past 16 rows the step runs in_proj and out_proj as GEMMs and the conv update, x_proj,
    dt_proj and the state update as our kernels: its decode steps equal the parallel prefill too."""
    from model.config import MambaConfig
    from model.mamba import MambaLM

    torch.manual_seed(1)
    with torch.no_grad():
        lm = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=64), backend="ref").init_weights(0)
        ids = torch.randint(0, 64, (18, 4))
        full = lm(ids)
        state, slots = lm.allocate_state(20), torch.randperm(20)[:18]
        lm(ids[:, :2], state=state, slots=slots)
        lm.set_backend("triton")
        assert not lm._fuses_step(ids.shape[0], ids.device), "18 rows take the unfused step"
        steps = [lm.step(ids[:, t], state=state, slots=slots) for t in range(2, 4)]
    y_err = max(err(s, full[:, t]) for s, t in zip(steps, range(2, 4)))
    record("unfused_decode_step", [18, 16, 2], torch.float32, y_err=y_err, state_err=0.0,
           y_scale=full.abs().max().item(), same_dtype=True)


def embed_norm_cases():
    """The decode step's first kernel: the rows gathered from the table by id (one twice, the ids
    a strided view), the stream kept in fp32 or the table's dtype, and the step's sums zeroed on
    the way."""
    for case, (dtype, fp32) in enumerate([(torch.float32, True), (torch.bfloat16, True), (torch.float16, False)]):
        r = rng(case + 40)
        table, w, ids = r(50, 40).to(dtype), r(40).to(dtype), torch.tensor([[3, 1], [49, 1], [3, 1], [0, 1]])[:, 0]
        z_ref, z_tri = r(3, 5000), r(3, 5000)
        n_ref, s_ref = K.embed_rms_norm_ref(ids, table, w, 1e-5, fp32, zero=z_ref)
        n_tri, s_tri = K.embed_rms_norm(ids, table, w, 1e-5, fp32, zero=z_tri, backend="triton")
        record("embed_rms_norm", [4, 40, fp32], dtype, y_err=err(n_tri, n_ref), y_scale=n_ref.float().abs().max().item(),
               state_err=max(err(s_tri, s_ref), err(z_tri, z_ref)),
               same_dtype=n_tri.dtype == n_ref.dtype and s_tri.dtype == s_ref.dtype)


def argmax_cases():
    """The masked argmax: the same index as torch's (first maximum, NaN above every number), and
    the masked ids at -inf in place; a row longer than one block, ties, NaN, an all -inf row, and
    ``out`` a slice of a larger buffer (its other entries untouched)."""
    for case, (b, V, dtype, masked) in enumerate([(3, 9000, torch.float32, True), (2, 5000, torch.bfloat16, False),
                                                  (4, 4200, torch.float16, True)]):
        x = rng(case + 7)(b, V).to(dtype)
        x[0, 4500 % V] = x[0, 17] = x[0].max() + 1  # a tie: the first index wins
        if case == 2:
            x[1, 4100] = x[1, 4150] = float("nan")
            x[2] = float("-inf")
        mask = (torch.arange(V) % 3 == 1) if masked else None
        if masked:
            mask[17] = False
        a, c = x.clone(), x.clone()
        want = K.masked_argmax_ref(a, mask)
        out = torch.full((b + 2,), -5, dtype=torch.long)
        got = K.masked_argmax(c, mask, out=out[1:b + 1], backend="triton")
        wrong = int((got != want).sum()) + int((out[0] != -5) + (out[-1] != -5)) + int(not torch.equal(out[1:b + 1], want))
        record("masked_argmax", [b, V, masked], dtype, y_err=float(wrong), y_scale=0.0,
               state_err=0.0 if torch.equal(a, c) or (a.isnan() == c.isnan()).all() and torch.equal(a.nan_to_num(0), c.nan_to_num(0)) else 1.0,
               same_dtype=got.dtype == want.dtype == torch.long)


state_update_cases()
linear_cases()
mixer_in_cases()
mixer_out_cases()
fused_step_cases()
unfused_step_cases()
argmax_cases()
embed_norm_cases()
fused_cases()
scan_cases()
scan_variant_cases()
conv_cases()
json.dump(results, sys.stdout)
