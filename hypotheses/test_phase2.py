"""Phase 2: do the critical heads implement a universal, position-free function? (2.1, 2.2)"""

import pytest

from harness import claim_params


@pytest.mark.parametrize("claim", claim_params(2))
def test_claim(claim, run_claim, assert_claim):
    result = run_claim(claim)  # measured on this model: effect, 95% CI, p, control
    assert_claim(result)  # SUPPORTED passes, REFUTED fails, INCONCLUSIVE is its own outcome
