"""Makes mamba-ssm and causal-conv1d compile for ``TORCH_CUDA_ARCH_LIST`` only.

Used by the Dockerfile's builder stage (on ``PYTHONPATH`` while it builds the two wheels).

Why: both packages' setup.py hard-code a ``-gencode`` list (sm_70 ... sm_120, depending on the
nvcc version), and torch's ``cpp_extension`` ignores ``TORCH_CUDA_ARCH_LIST`` as soon as an
extension passes any arch flag of its own (upstream issues state-spaces/mamba#625 and
Dao-AILab/causal-conv1d#39). Compiling for one architecture instead of six makes the build
several times faster and the image smaller. We drop the packages' arch flags as their extensions
are declared, so torch derives ``-gencode`` from ``TORCH_CUDA_ARCH_LIST`` as it does for any
extension. Without ``TORCH_CUDA_ARCH_LIST`` this does nothing.
"""

import os

# nvcc options that pick target architectures; "-gencode"/"--generate-code" take the next item.
_WITH_VALUE = ("-gencode", "--generate-code", "-arch", "--gpu-architecture", "-code", "--gpu-code")
_PREFIXES = ("-gencode=", "--generate-code=", "-arch=", "--gpu-architecture=", "-code=", "--gpu-code=", "arch=")


def strip_arch_flags(flags: list[str]) -> list[str]:
    out, skip_next = [], False
    for flag in flags:
        if skip_next:
            skip_next = False
        elif flag in _WITH_VALUE:
            skip_next = True
        elif not flag.startswith(_PREFIXES):
            out.append(flag)
    return out


def _install() -> None:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    try:
        from torch.utils import cpp_extension
    except ImportError:  # a Python process of the build that has no torch: nothing to patch
        return
    original = cpp_extension.CUDAExtension

    def CUDAExtension(name, sources, *args, **kwargs):
        extra = kwargs.get("extra_compile_args")
        if isinstance(extra, dict) and "nvcc" in extra:
            kwargs["extra_compile_args"] = {**extra, "nvcc": strip_arch_flags(list(extra["nvcc"]))}
        return original(name, sources, *args, **kwargs)

    cpp_extension.CUDAExtension = CUDAExtension


_install()
