"""Our Triton kernels. Importing this package needs triton; the dispatchers import it lazily.

``OPS`` names the ops that have a Triton kernel; the others raise BackendUnavailable for
``backend="triton"``. On a CPU they run under ``TRITON_INTERPRET=1`` (tests do that).
"""

import os

# These kernels were written, tested and measured with Triton fusing multiplies and adds into
# FMAs, its default so far (Triton 3.9 warns that 3.10 turns it off). Keep it on unless the user
# chose (TRITON_DEFAULT_FP_FUSION=0 turns it off; it is read when a kernel compiles).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from kernels.triton.argmax import masked_argmax_triton  # noqa: E402
from kernels.triton.causal_conv1d import causal_conv1d_triton, causal_conv1d_update_triton
from kernels.triton.decode import mixer_in_triton, mixer_out_triton
from kernels.triton.linear import linear_accumulate_triton, small_linear_triton
from kernels.triton.norm import add_rms_norm_triton, embed_rms_norm_triton
from kernels.triton.selective_scan import selective_scan_triton
from kernels.triton.selective_state_update import selective_state_update_triton

OPS = frozenset({"add_rms_norm", "selective_scan", "selective_state_update", "causal_conv1d", "causal_conv1d_update",
                 "small_linear", "linear_accumulate", "mixer_in", "mixer_out", "masked_argmax",
                 "embed_rms_norm"})

__all__ = ["OPS", "add_rms_norm_triton", "causal_conv1d_triton", "causal_conv1d_update_triton", "embed_rms_norm_triton",
           "linear_accumulate_triton", "masked_argmax_triton", "mixer_in_triton", "mixer_out_triton", "selective_scan_triton",
           "selective_state_update_triton", "small_linear_triton"]
