import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# Output rounding only: inputs are identical and both accumulate in fp32 (the chunked scan
# reassociates its sums, well inside these).
TOL = {"torch.float32": 1e-5, "torch.bfloat16": 1e-2, "torch.float16": 2e-3}
# States are fp32 in the scan and state update; conv states hold inputs, copied exactly.
STATE_TOL = {"selective_state_update": 5e-5, "selective_state_update_lowrank": 5e-5, "add_rms_norm": 1e-6, "small_linear": 0.0,
             "linear_accumulate": 0.0, "mixer_in": 1e-5, "mixer_in_xproj": 0.0, "mixer_out": 1e-5,
             "fused_decode_step": 0.0, "unfused_decode_step": 0.0, "masked_argmax": 0.0, "embed_rms_norm": 0.0,
             "selective_scan": 5e-5, "selective_scan_seq": 5e-5, "selective_scan_chunked": 5e-5, "selective_scan_channel": 5e-5, "causal_conv1d": 0.0, "causal_conv1d_update": 0.0}


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_worker.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("op,cases", [("selective_state_update", 6), ("selective_state_update_lowrank", 5),
                                      ("add_rms_norm", 3), ("small_linear", 5), ("linear_accumulate", 3),
                                      ("mixer_in", 5), ("mixer_in_xproj", 5), ("mixer_out", 5),
                                      ("fused_decode_step", 6), ("unfused_decode_step", 1), ("masked_argmax", 3), ("embed_rms_norm", 3), ("selective_scan", 4), ("selective_scan_seq", 2), ("selective_scan_chunked", 1), ("selective_scan_channel", 3), ("causal_conv1d", 6),
                                      ("causal_conv1d_update", 4)])
def test_triton_kernel_matches_reference_under_the_interpreter(results, op, cases):
    mine = [r for r in results if r["op"] == op]
    for r in mine:
        print(r)
        assert r["same_dtype"]
        assert r["state_err"] <= STATE_TOL[op]
        assert r["y_err"] <= TOL[r["dtype"]] * (1 + r["y_scale"])
    assert len(mine) == cases
