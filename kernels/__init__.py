"""Sequence-mixing kernels of Mamba-1: selective scan and causal depthwise conv1d.

Axis glossary used in every docstring of this package:

    b   batch (sequences in one call)
    l   sequence length (time steps)
    d   channels (the mixer's inner width, d_inner)
    n   state size per channel (d_state)
    w   convolution width (d_conv)
    p   slots of a state pool (p >= b when indices are given)

Each op has a PyTorch reference (``*_ref``) and one public dispatcher that takes
``backend="auto" | "cuda" | "triton" | "ref"``.
"""

from kernels._backend import BACKENDS, BackendUnavailable, resolve_backend
from kernels.argmax import masked_argmax, masked_argmax_ref
from kernels.linear import linear_accumulate, linear_accumulate_ref, small_linear, small_linear_ref
from kernels.norm import add_rms_norm, add_rms_norm_ref, embed_rms_norm, embed_rms_norm_ref
from kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref
from kernels.decode import mixer_in, mixer_in_fusable, mixer_in_ref, mixer_out, mixer_out_ref
from kernels.selective_scan import (
    selective_scan,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "add_rms_norm",
    "add_rms_norm_ref",
    "resolve_backend",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "embed_rms_norm",
    "embed_rms_norm_ref",
    "linear_accumulate",
    "linear_accumulate_ref",
    "masked_argmax",
    "masked_argmax_ref",
    "mixer_in",
    "mixer_in_fusable",
    "mixer_in_ref",
    "mixer_out",
    "mixer_out_ref",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
    "small_linear",
    "small_linear_ref",
]
