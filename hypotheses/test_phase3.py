"""Phase 3: what do the thoughts encode, and where does it come from? (3.1 probes, 3.2 attribution)"""

import pytest

from harness import claim_params


@pytest.mark.parametrize("claim", claim_params(3))
def test_claim(claim, run_claim, assert_claim):
    result = run_claim(claim)  # measured on this model: effect, 95% CI, p, control
    assert_claim(result)  # SUPPORTED passes, REFUTED fails, INCONCLUSIVE is its own outcome
