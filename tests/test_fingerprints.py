"""Every method gives, for the same seed, exactly the result recorded before the restructure."""

import json

import pytest

from tests.fingerprints import CASES, PATH, run_case

RECORDED = json.loads(PATH.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_same_model_bytes_and_accuracy_as_recorded(case, tmp_path):
    assert run_case(case, tmp_path) == RECORDED[case]
