"""The fast math of the Triton kernels, checked without a GPU: compiled for an H100 (sm_90),
the helpers emit the flush-to-zero special functions and a tanh.approx sigmoid with FAST and
the plain forms without it; and FAST is off wherever Triton interprets kernels on the CPU."""

import pytest

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.triton._math import exp2, fast_math, silu, softplus  # noqa: E402


@triton.jit
def _all_three(X, Y, FAST: tl.constexpr):
    x = tl.load(X + tl.arange(0, 128))
    tl.store(Y + tl.arange(0, 128), softplus(x, FAST) + silu(x, FAST) + exp2(x, FAST))


def _ptx(fast: bool) -> str:
    src = ASTSource(_all_three, signature={"X": "*fp32", "Y": "*fp32", "FAST": "constexpr"}, constexprs={"FAST": fast})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def test_fast_forms_compile_to_single_special_function_instructions():
    fast, plain = _ptx(True), _ptx(False)
    assert fast.count("ex2.approx.ftz.f32") == 2 and fast.count("lg2.approx.ftz.f32") == 1  # exp2; softplus
    assert fast.count("tanh.approx.f32") == 1  # the sigmoid of silu
    assert "ex2.approx.f32" not in fast and "lg2.approx.f32" not in fast and "tanh" not in plain
    assert "ex2.approx.f32" in plain  # tl.exp2 keeps subnormals


@pytest.mark.parametrize("value", ["1", "true", "on"])
def test_fast_math_is_off_under_the_interpreter(monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert not fast_math()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert fast_math()  # this torch is no ROCm build
