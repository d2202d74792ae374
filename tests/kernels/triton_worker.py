"""Run under TRITON_INTERPRET=1 by tests/kernels/test_triton.py: Triton kernels vs their references."""

import json
import sys

import torch

from kernels import selective_state_update, selective_state_update_ref

results = []
for (b, d, n, pool, dtype) in [(1, 8, 4, 1, torch.float32), (3, 40, 16, 7, torch.float32),
                               (2, 24, 5, 4, torch.bfloat16), (4, 16, 16, 9, torch.float16)]:
    g = torch.Generator().manual_seed(b * 100 + d)
    r = lambda *s: torch.randn(*s, generator=g)
    x, dt, z = r(b, d).to(dtype), (r(b, d) * 0.5).to(dtype), r(b, d).to(dtype)
    A, B, C, D, bias = -torch.exp(r(d, n) * 0.5), r(b, n).to(dtype), r(b, n).to(dtype), r(d), r(d) * 0.1
    state = r(pool, d, n)
    idx = torch.randperm(pool, generator=g)[:b] if pool > b else None
    if idx is None:
        state = state[:b].clone()
    s_ref, s_tri = state.clone(), state.clone()
    y_ref = selective_state_update_ref(s_ref, x, dt, A, B, C, D, z, bias, True, state_indices=idx)
    y_tri = selective_state_update(s_tri, x, dt, A, B, C, D, z, bias, True, state_indices=idx, backend="triton")
    results.append({"shape": [b, d, n, pool], "dtype": str(dtype),
                    "y_err": (y_tri.float() - y_ref.float()).abs().max().item(),
                    "state_err": (s_tri - s_ref).abs().max().item(),
                    "y_scale": y_ref.float().abs().max().item(), "same_dtype": y_tri.dtype == y_ref.dtype})
json.dump(results, sys.stdout)
