"""Our Triton kernels. Importing this package needs triton; the dispatchers import it lazily.

``OPS`` names the ops that have a Triton kernel; the others raise BackendUnavailable for
``backend="triton"``. On a CPU they run under ``TRITON_INTERPRET=1`` (tests do that).
"""

from kernels.triton.selective_state_update import selective_state_update_triton

OPS = frozenset({"selective_state_update"})

__all__ = ["OPS", "selective_state_update_triton"]
