"""Phase 1: are the critical heads and the hub thought causal? (claims 1.1-1.3)"""

import pytest

from harness.claims import load_registry

CLAIMS = [c for c in load_registry() if c.phase == 1]


@pytest.mark.phase1
@pytest.mark.parametrize("claim", CLAIMS, ids=[c.id for c in CLAIMS])
def test_claim(claim, model_name, judge_claim):
    judge_claim(claim, model_name)
