"""Phase 2: do the critical heads implement a universal, position-free function? (2.1, 2.2)"""

import pytest

from harness.pytest_plugin import claim_params


@pytest.mark.parametrize("claim", claim_params(2))
def test_claim(claim, model_name, judge_claim):
    judge_claim(claim, model_name)
