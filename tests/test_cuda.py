"""Every method on a CUDA device (skipped where there is none; ``scripts/gpu_check.sh`` runs them)."""

import numpy as np
import pytest
import torch

from tests.fingerprints import CASES, run_case

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.mark.parametrize("case", list(CASES))
def test_method_runs_on_cuda_and_matches_cpu_closely(case, tmp_path):
    cpu = run_case(case, tmp_path / "cpu", extra=["device=cpu"], keep_state=True)
    cuda = run_case(case, tmp_path / "cuda", extra=["device=cuda"], keep_state=True)
    # Same bytes on the wire; the model agrees to float tolerance (kernels differ, not the algorithm).
    assert cuda["bytes_up"] == cpu["bytes_up"] and cuda["bytes_down"] == cpu["bytes_down"]
    for key, value in cpu["state"].items():
        assert np.isfinite(cuda["state"][key]).all() if value.dtype.kind == "f" else True
        assert np.allclose(cuda["state"][key], value, rtol=1e-3, atol=1e-3), key


def test_fll_reports_the_cuda_allocator_peak(tmp_path):
    result = run_case("fll", tmp_path, extra=["device=cuda"], keep_state=True)
    assert result["records"][-1]["strategy"]["cuda-peak-memory-bytes"] > 0
