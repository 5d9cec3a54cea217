"""Phase 4: does the mechanism matter more for hard problems? (4.1 difficulty tiers)"""

import pytest

from harness import claim_params


@pytest.mark.parametrize("claim", claim_params(4))
def test_claim(claim, run_claim, assert_claim):
    result = run_claim(claim)  # measured on this model: effect, 95% CI, p, control
    assert_claim(result)  # SUPPORTED passes, REFUTED fails, INCONCLUSIVE is its own outcome
