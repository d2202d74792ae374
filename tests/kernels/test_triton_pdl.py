"""Programmatic dependent launch of the decode kernels, checked without a GPU: compiled for an
H100 (sm_90), each kernel prefetches only weights before it waits for the previous kernel and
writes nothing before that wait; only mixer_in (its conv windows) and the state update asked
for ``early`` (its state and constants) load anything before it; the prefetch of the next
kernel's weights comes after the wait; and the launch is off wherever it cannot run."""

import re

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels.triton._pdl as P  # noqa: E402
from kernels.triton._pdl import next_args, pdl, pdl_args  # noqa: E402
from kernels.triton.decode import _mixer_in_kernel, _mixer_out_kernel  # noqa: E402
from kernels.triton.linear import _small_linear_kernel  # noqa: E402
from kernels.triton.norm import _add_rms_norm_kernel  # noqa: E402
from kernels.triton.selective_state_update import _ssu_kernel  # noqa: E402

BF16 = "*bf16"
KERNELS = {
    "mixer_in": (_mixer_in_kernel, dict.fromkeys(("a_in", "w_in", "cpool", "cw", "cb", "w_x", "x_out", "z_out"), BF16)
                 | {"idx": "*i64", "xp": "*fp32"},
                 dict(HAS_CB=True, W=4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, BLOCK_R=256, STAGES=3), 512, True),
    "out_proj": (_small_linear_kernel, {"x": BF16, "w": BF16, "bias": BF16, "y": "*fp32"},
                 dict(HAS_BIAS=False, ACCUMULATE=True, MB=1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, STAGES=4), 256, False),
    "state_update": (_ssu_kernel, dict.fromkeys(("state", "A", "D", "dt_bias"), "*fp32")
                     | dict.fromkeys(("x", "dt", "B", "C", "z", "out", "Wdt"), BF16) | {"idx": "*i64"},
                     dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_IDX=True, LOWRANK=True,
                          A_IS_LOG=True, BLOCK_D=32, BLOCK_N=16, BLOCK_R=64, EARLY=False, EARLY_W=False), 256, False),
    "mixer_out": (_mixer_out_kernel, dict.fromkeys(("state", "xp", "A_log", "Dp", "dt_bias", "out"), "*fp32")
                  | dict.fromkeys(("x", "z", "w_dt", "w_out", "ys"), BF16) | {"idx": "*i64"},
                  dict(HAS_D=True, HAS_BIAS=True, BLOCK_C=64, BLOCK_S=16, BLOCK_R=256, BLOCK_M=16, BLOCK_O=256,
                       ONE=True, STAGES=5, PF_COLS=64), 1, True),
    "norm": (_add_rms_norm_kernel, {"x": BF16, "res": "*fp32", "w": BF16, "out": BF16, "res_out": "*fp32",
                                    "eps": "fp32"}, dict(HAS_RES=True, BLOCK=4096), 0, False),
}
# The state update in the decode step: state and constants (and at one row dt_proj's tile) before the wait;
# at 32-channel blocks it still prefetches dt_proj's rows into L2 there instead.
_SSU = KERNELS["state_update"]
KERNELS["state_update_early"] = (_SSU[0], _SSU[1], _SSU[2] | dict(BLOCK_D=16, BLOCK_R=256, EARLY=True, EARLY_W=True),
                                 0, True)
KERNELS["state_update_early32"] = (_SSU[0], _SSU[1], _SSU[2] | dict(EARLY=True), 256, True)
# mixer_out over several rows: y through memory to the tensor-core dot.
_MO = KERNELS["mixer_out"]
KERNELS["mixer_out_rows"] = (_MO[0], _MO[1], _MO[2] | dict(ONE=False, STAGES=4), 1, True)
# What a kernel may read before its wait: what the kernel launched just before it does not write.
EARLY_SOURCES = {"mixer_in": {"cpool", "cw", "cb", "idx"},
                 "state_update_early": {"state", "A", "D", "dt_bias", "idx", "Wdt"},
                 "state_update_early32": {"state", "A", "D", "dt_bias", "idx", "Wdt"},
                 "mixer_out": {"state", "idx", "A_log", "Dp", "dt_bias", "w_dt"},
                 "mixer_out_rows": {"state", "idx", "A_log", "Dp", "dt_bias", "w_dt"}}


def _signature(name: str, on: bool, next_bytes: int = 0) -> tuple:
    fn, pointers, consts, prefetch, _ = KERNELS[name]  # prefetch: elements of each weight row
    consts = consts | {"PDL": on, "PREFETCH": prefetch if on else 0}
    if "NEXT" in fn.arg_names:
        consts["NEXT"] = next_bytes if on else 0
    pointers = pointers | {"nxt": BF16}
    signature = {a: pointers.get(a, "constexpr" if a in consts else "i32") for a in fn.arg_names}
    return fn, signature, consts


def _ptx(name: str, on: bool, next_bytes: int = 0) -> str:
    fn, signature, consts = _signature(name, on, next_bytes)
    src = ASTSource(fn, signature=signature, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"launch_pdl": on}).asm["ptx"]


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernels_wait_for_the_previous_one_before_touching_its_outputs(name):
    ptx = _ptx(name, True)
    wait, signal = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
    first = lambda *ops: min([i for i in (ptx.find(op) for op in ops) if i >= 0], default=len(ptx))
    assert 0 <= wait < signal < first("cp.async", "atom.global", "red.global", "st.global")  # no write, no pipelined load
    sources = _early_load_sources(name, ptx[:wait])
    assert bool(sources) == KERNELS[name][4]  # only the kernels that read state and constants early
    for src in sources:  # and their addresses derive only from what the kernel before does not write
        assert src and src <= EARLY_SOURCES[name], src
    prefetches = [i for i in range(len(ptx)) if ptx.startswith("prefetch.global.L2", i)]
    if KERNELS[name][3]:  # every weight prefetch comes before the wait
        assert prefetches and max(prefetches) < wait
    else:
        assert not prefetches
    plain = _ptx(name, False)
    assert "griddepcontrol" not in plain and "prefetch" not in plain


def _early_load_sources(name: str, ptx: str) -> list[set]:
    """For each global load in ``ptx`` (straight-line code before the wait), the pointer
    arguments its address derives from: registers carry the arguments of every register they
    are computed from, and a loaded value those of its address (a slot index, say)."""
    fn, signature, _ = _signature(name, True)
    params = [a for a in fn.arg_names if signature[a] != "constexpr"]
    taint: dict[str, set] = {}
    sources = []
    for line in ptx.splitlines():
        line = re.sub(r"^\s*@!?%\w+\s+", "", line.strip())
        m = re.match(r"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)\]", line)
        if m:
            k = int(m.group(2))  # pointers only: sizes and strides say nothing about what is read
            taint[m.group(1)] = {params[k]} if k < len(params) and signature[params[k]].startswith("*") else set()
            continue
        regs = re.findall(r"%\w+", line)
        if line.startswith("ld.global"):
            addr = re.search(r"\[\s*(%\w+)", line).group(1)
            src = set(taint.get(addr, set()))
            sources.append(src)
            for reg in re.findall(r"%\w+", line.split("[")[0]):  # the loaded registers
                taint[reg] = taint.get(reg, set()) | src
        elif regs:
            src = set().union(*(taint.get(r, set()) for r in regs[1:]))
            if src:
                taint[regs[0]] = taint.get(regs[0], set()) | src
    return sources


def test_launch_is_off_where_it_cannot_run(monkeypatch):
    assert not pdl(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl(torch.device("cuda"))  # the interpreter has no grid dependency control
    assert pdl_args(torch.device("cuda"), torch.empty(4, 64, dtype=torch.bfloat16), 512) == {
        "PDL": False, "PREFETCH": 0, "launch_pdl": False}


def test_prefetch_rounds_up_to_whole_lines(monkeypatch):
    monkeypatch.setattr("kernels.triton._pdl.pdl", lambda device: True)
    w16, w32 = torch.empty(4, 64, dtype=torch.bfloat16), torch.empty(4, 64, dtype=torch.float32)
    assert pdl_args(torch.device("cuda"), w16, 512)["PREFETCH"] == 512  # 8 lines of 64 elements
    assert pdl_args(torch.device("cuda"), w16, 160)["PREFETCH"] == 256  # 2.5 lines -> 4
    assert pdl_args(torch.device("cuda"), w32, 160)["PREFETCH"] == 256  # 5 lines of 32 -> 8
    assert pdl_args(torch.device("cuda"), w16, 0)["PREFETCH"] == 0
    assert pdl_args(torch.device("cuda"))["PREFETCH"] == 0 and pdl_args(torch.device("cuda"))["launch_pdl"]


@pytest.mark.parametrize("name", ["mixer_in", "out_proj", "mixer_out", "mixer_out_rows"])
def test_prefetch_ahead_is_issued_after_the_wait(name):
    ptx = _ptx(name, True, next_bytes=40960)
    wait = ptx.find("griddepcontrol.wait")
    bulk = [i for i in range(len(ptx)) if ptx.startswith("cp.async.bulk.prefetch.L2.global", i)]
    assert bulk and 0 <= wait < min(bulk)
    assert "cp.async.bulk" not in _ptx(name, True) and "cp.async.bulk" not in _ptx(name, False)


def test_prefetch_ahead_splits_the_next_weights_evenly_over_the_programs(monkeypatch):
    cuda, dummy = torch.device("cuda"), torch.empty(1)
    w = torch.empty(1280, 2560, dtype=torch.bfloat16)  # an eighth of the 2.8B model's in_proj: 6.5 MB
    monkeypatch.setattr("kernels.triton._pdl.pdl", lambda device: True)
    nxt, total, per = next_args(cuda, w, 160, 4, dummy)
    assert nxt is w and total == 1280 * 2560 * 2 and per == total // 160
    for programs in (7, 320, 1000):  # bulk prefetches need 16-byte multiples; together they cover it all
        per = next_args(cuda, w, programs, 4, dummy)[2]
        assert per % 16 == 0 and programs * per >= total > (programs - 1) * per - 16 * programs
    assert next_args(cuda, None, 160, 4, dummy) == (dummy, 0, 0)
    assert next_args(cuda, w[:, :100], 160, 4, dummy) == (dummy, 0, 0)  # not one contiguous span
    assert next_args(cuda, torch.empty(5, dtype=torch.bfloat16), 1, 4, dummy) == (dummy, 0, 0)  # 10 bytes
    assert next_args(cuda, w, 3, 4, dummy) == (dummy, 0, 0)  # 2.2 MB per program: more than 128 threads ask for
    assert next_args(cuda, w, 3, 8, dummy)[2] > 2 << 20  # 256 threads can
    monkeypatch.setattr(P, "PREFETCH_AHEAD", False)
    assert next_args(cuda, w, 160, 4, dummy) == (dummy, 0, 0)
    monkeypatch.setattr(P, "PREFETCH_AHEAD", True)
    monkeypatch.setattr("kernels.triton._pdl.pdl", lambda device: False)  # plain launches prefetch nothing
    assert next_args(cuda, w, 160, 4, dummy) == (dummy, 0, 0)


def test_pipeline_stages_fit_the_shared_memory(monkeypatch):
    """The deep pipelines of mixer_out and out_proj (5 stages of 32 KB tiles) shrink where a GPU
    has less shared memory per program than an H100's 227 KB, so the kernels still launch."""
    import kernels.triton.linear as L

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(L, "_shared_memory", lambda index: 232448)  # H100
    assert L.fit_stages(cuda, 32768, 5) == 5 and L.fit_stages(cuda, 65536, 5) == 3
    monkeypatch.setattr(L, "_shared_memory", lambda index: 101376)  # 99 KB (sm_86/89)
    assert L.fit_stages(cuda, 32768, 5) == 2 and L.fit_stages(cuda, 8192, 4) == 4
    assert L.fit_stages(cuda, 1 << 20, 4) == 2  # never below a double buffer
    assert L.fit_stages(torch.device("cpu"), 1 << 20, 5) == 5  # the interpreter takes any
