"""Phase 1: are the critical heads and the hub thought causal? (claims 1.1-1.3)"""

import pytest

from harness import claim_params


@pytest.mark.parametrize("claim", claim_params(1))
def test_claim(claim, run_claim, assert_claim):
    result = run_claim(claim)  # measured on this model: effect, 95% CI, p, control
    assert_claim(result)  # SUPPORTED passes, REFUTED fails, INCONCLUSIVE is its own outcome
