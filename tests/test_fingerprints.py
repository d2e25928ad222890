"""Every method gives, for the same seed, the result recorded before the restructure.

Bytes exactly; the final model and accuracy to a tolerance that covers the
last-bit float differences between CPU families (see ``tests.fingerprints``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fingerprints import CASES, PATH, fingerprint_mismatches, run_case

RECORDED = json.loads(PATH.read_text())
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("case", list(CASES))
def test_same_bytes_and_close_model_and_accuracy_as_recorded(case, tmp_path):
    assert fingerprint_mismatches(run_case(case, tmp_path), RECORDED[case]) == []


@pytest.mark.parametrize("kernels", ["avx2", "default"])
def test_fingerprints_hold_with_other_cpu_kernels(kernels):
    """The same cases with other CPU kernels (AVX2, or no vector extensions) agree
    within the tolerances: what another CPU family does to the last bits. Two cases:
    the FedLP one whose run crosses a kink under AVX2, and the ResNet with BatchNorm."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": kernels, "ONEDNN_MAX_CPU_ISA": "AVX2" if kernels == "avx2" else "SSE41"}
    cases = ["fedlp-homogeneous", "fll-resnet-dropout"]
    done = subprocess.run([sys.executable, "-m", "tests.fingerprints", "--check", *cases], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
