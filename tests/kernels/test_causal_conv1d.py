import pytest
import torch

from kernels import BackendUnavailable, causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref


def _naive_conv(x, weight, bias, h0, silu):
    b, d, l = x.shape
    w = weight.shape[1]
    xs = torch.cat([h0, x], -1).float()
    y = torch.zeros(b, d, l)
    for t in range(l):
        for k in range(w):
            y[:, :, t] += weight[:, k].float() * xs[:, :, t + k]
        y[:, :, t] += bias.float()
    return torch.nn.functional.silu(y) if silu else y


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("b,d,l,w", [(1, 3, 1, 4), (2, 8, 11, 4), (3, 5, 2, 3)])
@pytest.mark.parametrize("act", [None, "silu"])
def test_conv_matches_naive_loop(b, d, l, w, act, dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, l, generator=g).to(dtype)
    weight, bias = torch.randn(d, w, generator=g), torch.randn(d, generator=g)
    h0 = torch.randn(b, d, w - 1, generator=g).to(dtype)
    y, state = causal_conv1d_ref(x, weight, bias, act, initial_state=h0)
    y_naive = _naive_conv(x, weight, bias, h0, act is not None)
    print("max diff", (y.float() - y_naive).abs().max().item())
    torch.testing.assert_close(y.float(), y_naive, atol=tol, rtol=tol)
    full = torch.cat([h0, x], -1)
    assert torch.equal(state, full[:, :, -(w - 1):])


def test_conv_in_two_halves_equals_one_pass():
    x = torch.randn(2, 6, 10)
    weight, bias = torch.randn(6, 4), torch.randn(6)
    y, state = causal_conv1d(x, weight, bias, "silu", backend="ref")
    y1, s1 = causal_conv1d(x[..., :3], weight, bias, "silu", backend="ref")
    y2, s2 = causal_conv1d(x[..., 3:], weight, bias, "silu", initial_state=s1, backend="ref")
    torch.testing.assert_close(torch.cat([y1, y2], -1), y)
    torch.testing.assert_close(s2, state)


def test_update_steps_equal_sequence_and_touch_only_addressed_slots():
    b, d, l, w, pool = 2, 4, 6, 4, 5
    x = torch.randn(b, d, l)
    weight, bias = torch.randn(d, w), torch.randn(d)
    y_seq, state_seq = causal_conv1d_ref(x, weight, bias, "silu")
    pool_state = torch.randn(pool, d, w - 1)
    idx = torch.tensor([3, 0])
    pool_state[idx] = 0
    before = pool_state.clone()
    ys = [causal_conv1d_update_ref(x[..., t], pool_state, weight, bias, "silu", state_indices=idx) for t in range(l)]
    torch.testing.assert_close(torch.stack(ys, -1), y_seq)
    torch.testing.assert_close(pool_state[idx], state_seq)
    others = [1, 2, 4]
    assert torch.equal(pool_state[others], before[others])


def test_update_without_indices_and_bad_activation():
    x, state = torch.randn(2, 3), torch.zeros(2, 3, 3)
    y = causal_conv1d_update(x, state, torch.ones(3, 4), None, None, backend="ref")
    torch.testing.assert_close(y, x)
    assert torch.equal(state[:, :, -1], x)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_update_ref(x, state, torch.ones(3, 4), None, "relu")
    with pytest.raises(BackendUnavailable):
        causal_conv1d(torch.randn(1, 3, 4), torch.ones(3, 4), backend="cuda")


def test_triton_conv_refuses_widths_it_cannot_hold():
    """The Triton prefill conv keeps at most three past inputs in registers: wider convs are
    refused with BackendUnavailable (``auto`` then runs the reference) instead of computing
    something else."""
    pytest.importorskip("triton")
    from kernels.triton.causal_conv1d import causal_conv1d_triton

    x, w = torch.randn(1, 8, 5), torch.randn(8, 5)
    with pytest.raises(BackendUnavailable, match="widths 2-4"):
        causal_conv1d_triton(x, w)
