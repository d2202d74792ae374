"""Triton kernels against their references at the Mamba-2.8B shape, in bf16, on a GPU.

Skipped without CUDA. Tolerances: the references compute in fp32 from the same bf16 inputs,
so outputs differ by bf16 output rounding plus fp32 reassociation (the chunked scan sums in
another order); states are fp32 on both sides.
"""

import pytest
import torch

from kernels import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
    selective_scan,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")

D, N, W = 5120, 16, 4


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("b,l", [(1, 768), (4, 333), (16, 203)])
def test_scan_on_pool_with_lengths(b, l):
    g = torch.Generator(device="cuda").manual_seed(b)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    xz = r(b, l, 2 * D).bfloat16()
    u, z = xz[..., :D].transpose(1, 2), xz[..., D:].transpose(1, 2)
    delta = (r(b, l, D) * 0.5 - 2).bfloat16().transpose(1, 2)
    A = -torch.exp(r(D, N) * 0.5)
    BC = r(b, l, 2 * N).bfloat16()
    B, C = BC[..., :N].transpose(1, 2), BC[..., N:].transpose(1, 2)
    Dv, bias = r(D), r(D) * 0.1
    lengths = torch.randint(1, l + 1, (b,), device="cuda", generator=g)
    lengths[0] = l
    pool = r(b + 5, D, N)
    idx = torch.randperm(b + 5, device="cuda", generator=g)[:b]
    p_ref, p_tri = pool.clone(), pool.clone()
    y_ref, _ = selective_scan_ref(u, delta, A, B, C, Dv, z, bias, True, lengths=lengths, state=p_ref, state_indices=idx)
    y_tri, _ = selective_scan(u, delta, A, B, C, Dv, z, bias, True, lengths=lengths, state=p_tri, state_indices=idx,
                              backend="triton")
    valid = (torch.arange(l, device="cuda")[None, :] < lengths[:, None])[:, None, :]
    y_err = _rel(y_tri * valid, y_ref * valid)
    s_err = _rel(p_tri, p_ref)
    print(f"scan b={b} l={l}: y rel err {y_err:.2e}, state rel err {s_err:.2e}")
    assert y_err < 1e-2 and s_err < 1e-4


def test_channel_scan_compiles_within_its_register_cap(monkeypatch):
    """The "channel" loop at 16 sequences of d 5120 must fit 96 registers without spilling: at the
    120 the compiler takes uncapped, an SM holds 16 warps instead of 20 and the grid runs in two
    waves (twice the time); spills would cost as much."""
    import kernels.triton.selective_scan as S

    kernel, launched = S._scan_channel_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kernel[grid](*args, **kwargs))
                return launched[-1]
            return launch

    monkeypatch.setattr(S, "_scan_channel_kernel", Recorder())
    b, l = 16, 40
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    xz = r(b, l, 2 * D).bfloat16()
    BC = r(b, l, 2 * N).bfloat16()
    pool, idx = torch.zeros(b, D, N, device="cuda"), torch.arange(b, device="cuda")
    S.selective_scan_triton(xz[..., :D].transpose(1, 2), (r(b, l, D) * 0.5 - 2).bfloat16().transpose(1, 2),
                            -torch.exp(r(D, N) * 0.5), BC[..., :N].transpose(1, 2), BC[..., N:].transpose(1, 2),
                            r(D), xz[..., D:].transpose(1, 2), r(D), True, state=pool, state_indices=idx)
    assert S._config(b, D, N)[0] == "channel" and len(launched) == 1
    assert launched[0].n_regs <= 96 and launched[0].n_spills == 0, (launched[0].n_regs, launched[0].n_spills)


@pytest.mark.parametrize("b,l", [(1, 768), (8, 100)])
def test_conv_on_pool_with_lengths(b, l):
    g = torch.Generator(device="cuda").manual_seed(b)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    x = r(b, l, 2 * D).bfloat16()[..., :D].transpose(1, 2)
    w, bias = r(D, W).bfloat16(), r(D).bfloat16()
    lengths = torch.randint(1, l + 1, (b,), device="cuda", generator=g)
    pool = r(b + 3, D, W - 1).bfloat16()
    idx = torch.randperm(b + 3, device="cuda", generator=g)[:b]
    p_ref, p_tri = pool.clone(), pool.clone()
    y_ref, _ = causal_conv1d_ref(x, w, bias, "silu", lengths=lengths, conv_state=p_ref, state_indices=idx)
    y_tri, _ = causal_conv1d(x, w, bias, "silu", lengths=lengths, conv_state=p_tri, state_indices=idx,
                             backend="triton")
    err = _rel(y_tri, y_ref)
    print(f"conv b={b} l={l}: y rel err {err:.2e}")
    assert err < 1e-2 and torch.equal(p_tri, p_ref)


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("b", [1, 64, 256])
def test_decode_kernels(b, early):
    g = torch.Generator(device="cuda").manual_seed(b)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    xz = r(b, 2 * D).bfloat16()
    x, z = xz[:, :D], xz[:, D:]
    w, cb = r(D, W).bfloat16(), r(D).bfloat16()
    idx = torch.randperm(b + 7, device="cuda", generator=g)[:b]
    cpool = r(b + 7, D, W - 1).bfloat16()
    c_ref, c_tri = cpool.clone(), cpool.clone()
    xc_ref = causal_conv1d_update_ref(x, c_ref, w, cb, "silu", state_indices=idx)
    xc_tri = causal_conv1d_update(x, c_tri, w, cb, "silu", state_indices=idx, backend="triton")
    assert torch.equal(c_ref, c_tri) and _rel(xc_tri, xc_ref) < 1e-2
    dt, A, B, C = (r(b, D) * 0.5 - 2).bfloat16(), -torch.exp(r(D, N) * 0.5), r(b, N).bfloat16(), r(b, N).bfloat16()
    Dv, bias, spool = r(D), r(D) * 0.1, r(b + 7, D, N)
    s_ref, s_tri = spool.clone(), spool.clone()
    y_ref = selective_state_update_ref(s_ref, xc_ref, dt, A, B, C, Dv, z, bias, True, state_indices=idx)
    y_tri = selective_state_update(s_tri, xc_ref, dt, A, B, C, Dv, z, bias, True, state_indices=idx,
                                   early=early, backend="triton")
    print(f"decode b={b} early={early}: conv rel err {_rel(xc_tri, xc_ref):.2e}, ssu y rel err {_rel(y_tri, y_ref):.2e}, "
          f"state rel err {_rel(s_tri, s_ref):.2e}")
    assert _rel(y_tri, y_ref) < 1e-2 and _rel(s_tri, s_ref) < 1e-5


@pytest.mark.parametrize("b", [3, 20])
def test_graph_decode_equals_prefill_on_gpu(b):
    """A small bf16 LM on the Triton path: prefill of a prompt + CUDA-graph decode steps give the
    logits of one parallel prefill over the whole sequence (3 rows: the fused step; 20: the step
    with cuBLAS in_proj/out_proj and our x_proj/dt_proj kernels)."""
    from model.config import MambaConfig
    from model.graphs import GraphDecoder
    from model.mamba import MambaLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        lm = MambaLM(MambaConfig(d_model=256, n_layer=4, vocab_size=1000), dtype=torch.bfloat16).init_weights(0)
    ids = torch.randint(0, 1000, (b, 40), device="cuda")
    with torch.inference_mode():
        full = lm(ids).float()  # (b, 40, V)
        state = lm.allocate_state(b + 2)
        slots = torch.randperm(b + 1, device="cuda")[:b]
        graphs = GraphDecoder(lm, state, scratch_slot=b + 1, max_batch=32).capture()
        lm(ids[:, :30], state=state, slots=slots, last_only=True)
        steps = [graphs.step(ids[:, t], slots).float() for t in range(30, 40)]
    err = max((s - full[:, t]).abs().max().item() for s, t in zip(steps, range(30, 40)))
    scale = full.abs().max().item()
    print(f"graph decode vs prefill: max abs err {err:.3g} (logit scale {scale:.3g})")
    assert err < 0.05 * scale


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("b", [1, 4, 16])
def test_fused_step_and_norm(b, early):
    """The state update with dt_proj folded in (16-, 32- and 64-channel blocks; ``early``: the
    state, constants and at one row dt_proj's tile read before the wait), and add + RMSNorm."""
    from kernels import add_rms_norm, add_rms_norm_ref

    g = torch.Generator(device="cuda").manual_seed(b)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    xz, xproj = r(b, 2 * D).bfloat16(), r(b, 160 + 2 * N).bfloat16()
    dt_low, B, C = xproj.split([160, N, N], dim=-1)
    W, A_log, Dv, bias = (r(D, 160) * 0.05).bfloat16(), r(D, N) * 0.5, r(D), r(D).bfloat16()
    pool, idx = r(b + 3, D, N), torch.randperm(b + 3, device="cuda", generator=g)[:b]
    p_ref, p_tri = pool.clone(), pool.clone()
    args = (xz[:, :D], dt_low, A_log, B, C, Dv, xz[:, D:], bias, True, idx, W, True)
    y_ref = selective_state_update_ref(p_ref, *args)
    y_tri = selective_state_update(p_tri, *args, early=early, backend="triton")
    x, res, w = r(b, 2560).bfloat16(), r(b, 2560), (1 + 0.1 * r(2560)).bfloat16()
    n_ref, r_ref = add_rms_norm_ref(x, res, w)
    n_tri, r_tri = add_rms_norm(x, res, w, backend="triton")
    print(f"fused step b={b} early={early}: y rel err {_rel(y_tri, y_ref):.2e}, state {_rel(p_tri, p_ref):.2e}; "
          f"norm rel err {_rel(n_tri, n_ref):.2e}")
    assert _rel(y_tri, y_ref) < 1e-2 and _rel(p_tri, p_ref) < 1e-5
    assert _rel(n_tri, n_ref) < 1e-2 and torch.equal(r_tri, r_ref)


@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(10240, 2560), (192, 5120), (2560, 5120), (50280, 2560)])
def test_small_linear_bf16(m, n, k):
    from kernels import small_linear, small_linear_ref

    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, 2 * k, device="cuda", generator=g).bfloat16()[:, :k]
    w = (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5).bfloat16()
    err = _rel(small_linear(x, w, backend="triton"), small_linear_ref(x, w))
    print(f"small_linear m={m} n={n} k={k}: rel err {err:.2e}")
    assert err < 1e-2


@pytest.mark.parametrize("m", [33, 65, 256])
def test_wide_narrow_projections(m):
    """The unfused decode step's x_proj (split-K into float32, several row blocks) and dt_proj
    (from those float32 sums, rounded to bf16) against the references."""
    from kernels import linear_accumulate, linear_accumulate_ref, small_linear, small_linear_ref

    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 2 * D, device="cuda", generator=g).bfloat16()[:, :D]
    w_x = (torch.randn(160 + 2 * N, D, device="cuda", generator=g) * D ** -0.5).bfloat16()
    w_dt = (torch.randn(D, 160, device="cuda", generator=g) * 160 ** -0.5).bfloat16()
    xp = linear_accumulate(x, w_x, torch.zeros(m, 160 + 2 * N, device="cuda"), backend="auto", max_rows=None)
    xp_ref = linear_accumulate_ref(x, w_x, torch.zeros(m, 160 + 2 * N, device="cuda"))
    dt_low = xp[:, :160]
    dt = small_linear(dt_low, w_dt, backend="auto", max_rows=None)
    errs = _rel(xp, xp_ref), _rel(dt, small_linear_ref(dt_low, w_dt))
    print(f"m={m}: x_proj rel err {errs[0]:.2e}, dt_proj {errs[1]:.2e}")
    assert dt.dtype == torch.bfloat16 and max(errs) < 1e-2


@pytest.mark.parametrize("m", [1, 4, 16])
def test_fused_in_proj_and_accumulate_bf16(m):
    """mixer_in (in_proj + conv update + x_proj) and the split-K out_proj at the 2.8B shapes."""
    from kernels import linear_accumulate, linear_accumulate_ref, mixer_in, mixer_in_ref

    g = torch.Generator(device="cuda").manual_seed(m)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    normed = r(m, 2560).bfloat16()
    w_in, w_x = (r(2 * D, 2560) * 2560 ** -0.5).bfloat16(), (r(192, D) * D ** -0.5).bfloat16()
    pool, cw, cb = r(m + 2, D, W - 1).bfloat16(), (r(D, W) * 0.5).bfloat16(), r(D).bfloat16()
    idx = torch.randperm(m + 2, device="cuda", generator=g)[:m]
    outs = []
    for fn in (mixer_in_ref, mixer_in):
        p, xp = pool.clone(), torch.zeros(m, 192, device="cuda")
        x, z = fn(normed, w_in, p, cw, cb, idx, w_x, xp)
        outs.append((x, z, p, xp))
    errs = {k: _rel(a, b) for k, a, b in zip(("x", "z", "conv state", "x_proj"), outs[1], outs[0])}
    y = r(m, D).bfloat16()
    w_out = (r(2560, D) * D ** -0.5).bfloat16()
    errs["out_proj"] = _rel(linear_accumulate(y, w_out, torch.zeros(m, 2560, device="cuda"), backend="triton"),
                            linear_accumulate_ref(y, w_out, torch.zeros(m, 2560, device="cuda")))
    print(f"fused in_proj m={m}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) < 1e-2


@pytest.mark.parametrize("m,state_dtype", [(1, torch.float32), (2, torch.float32), (4, torch.float32),
                                           (1, torch.bfloat16)])
def test_mixer_out_bf16(m, state_dtype):
    """mixer_out (state update with dt_proj + out_proj in one kernel) at the 2.8B shapes: one row
    (products from registers), two (the decode step's forms) and four (the tensor-core dot)."""
    from kernels import mixer_out, mixer_out_ref

    g = torch.Generator(device="cuda").manual_seed(10 + m)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    x, z, xp = r(m, D).bfloat16(), r(m, D).bfloat16(), r(m, 160 + 2 * N)
    A_log, Dv, bias = r(D, N) * 0.5, r(D), r(D) * 0.1 - 3
    w_dt, w_out = (r(D, 160) * 160 ** -0.5).bfloat16(), (r(2560, D) * D ** -0.5).bfloat16()
    pool, idx, out0 = r(m + 2, D, N).to(state_dtype), torch.randperm(m + 2, device="cuda", generator=g)[:m], r(m, 2560)
    outs = []
    for fn in (mixer_out_ref, mixer_out):
        p, out = pool.clone(), out0.clone()
        fn(p, x, z, xp, A_log, Dv, bias, w_dt, idx, w_out, out)
        outs.append((out, p))
    err, s_err = _rel(outs[1][0], outs[0][0]), _rel(outs[1][1], outs[0][1])
    print(f"mixer_out m={m} {state_dtype}: out rel err {err:.2e}, state {s_err:.2e}")
    assert err < 1e-2 and s_err < (1e-2 if state_dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("b", [1, 2, 3])
def test_fused_decode_step_equals_unfused(b):
    """The fused step (few rows: three kernels, two at one or two rows) and the per-op step give
    the same logits and states."""
    from model.config import MambaConfig
    from model.mamba import MambaLM

    torch.manual_seed(1)
    with torch.device("cuda"):
        lm = MambaLM(MambaConfig(d_model=256, n_layer=4, vocab_size=1000), dtype=torch.bfloat16).init_weights(1)
    ids = torch.randint(0, 1000, (b, 12), device="cuda")
    slots = torch.tensor([0, 2, 1][:b], device="cuda")
    logits, states = [], []
    with torch.inference_mode():
        for fused in (True, False):
            state = lm.allocate_state(3)
            lm(ids[:, :8], state=state, slots=slots)
            lm._fuses_step = (lambda rows, device: True) if fused else (lambda rows, device: False)
            logits.append(torch.stack([lm.step(ids[:, t], state=state, slots=slots) for t in range(8, 12)]))
            states.append(state.ssm)
            del lm._fuses_step
    err, s_err = _rel(logits[0], logits[1]), _rel(states[0], states[1])
    print(f"fused vs unfused decode: logits rel err {err:.2e}, ssm state rel err {s_err:.2e}")
    assert err < 2e-2 and s_err < 2e-2


@pytest.mark.parametrize("rows", [1, 4])
def test_decode_graph_with_programmatic_dependent_launch_equals_plain_launches(monkeypatch, rows):
    """The decode kernels launched with programmatic dependent launch (each waits for the kernel
    before it, after prefetching weights), with and without the prefetch of the next weights
    ahead, give, replayed from a CUDA graph over many steps, the logits and states of plain
    launches: a missing wait would read the previous layer's output before it is written
    (errors of order 1). Atomic adds in another
    order are the only difference allowed; over 32 steps they reach ~1.5e-3 in the logits and
    ~2.5e-3 in the states (H100)."""
    import kernels.triton._pdl as P
    from model.config import MambaConfig
    from model.graphs import GraphDecoder
    from model.mamba import MambaLM

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    assert P.pdl(torch.device("cuda"))
    torch.manual_seed(2)
    with torch.device("cuda"):
        lm = MambaLM(MambaConfig(d_model=2560, n_layer=4, vocab_size=50280), dtype=torch.bfloat16).init_weights(2)
    ids = torch.randint(0, 50280, (rows, 48), device="cuda")
    slots = torch.tensor([3, 0, 4, 1][:rows], device="cuda")
    runs = {}
    with torch.inference_mode():
        for setting, ahead in (("0", True), ("1", False), ("1", True)):
            monkeypatch.setenv("VLMAMBA_PDL", setting)
            monkeypatch.setattr(P, "PREFETCH_AHEAD", ahead)
            state = lm.allocate_state(6)
            graphs = GraphDecoder(lm, state, scratch_slot=5, max_batch=4).capture()
            lm(ids[:, :16], state=state, slots=slots, last_only=True)
            logits = torch.stack([graphs.step(ids[:, t], slots) for t in range(16, 48)]).float()
            torch.cuda.synchronize()
            runs[setting, ahead] = logits, state.ssm[:, slots].clone()  # the scratch row is padding's, racing
    plain, s_plain = runs["0", True]
    for ahead in (False, True):
        pdl_on, s_pdl = runs["1", ahead]
        err, s_err = _rel(pdl_on, plain), _rel(s_pdl, s_plain)
        print(f"decode graph with PDL (ahead {ahead}) vs without (32 steps, b={rows}): logits rel err {err:.2e}, "
              f"state {s_err:.2e}")
        assert err < 1e-2 and s_err < 1e-2
        assert torch.equal(pdl_on.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("b", [1, 3, 256])
def test_masked_argmax_at_the_vocabulary_size(b):
    """The masked argmax over bf16 logits of the 2.8B vocabulary (50 280 ids) picks torch's
    index and leaves the same masked logits, with ties planted at the row's end and start."""
    from kernels import masked_argmax, masked_argmax_ref

    g = torch.Generator(device="cuda").manual_seed(b)
    x = (torch.randn(b, 50280, device="cuda", generator=g) * 3).bfloat16()
    x[:, -1] = x[:, 0] = 20.0  # ties: the first index wins
    mask = torch.zeros(50280, dtype=torch.bool, device="cuda")
    mask[50277:] = True
    mask[0] = b == 3  # with three rows the first of the tie is masked
    a, c = x.clone(), x.clone()
    want = masked_argmax_ref(a, mask)
    got = masked_argmax(c, mask, backend="triton")
    assert torch.equal(got, want) and torch.equal(a, c)
