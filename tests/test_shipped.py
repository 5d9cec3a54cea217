"""The shipped tiny models: their cards describe them and match a fresh evaluation."""

import json
from pathlib import Path

import pytest

from harness.commands.training import teacher_accuracy
from harness.measures.evaluation import evaluate, mean_patch, thought_means
from harness.runtime.models import MODEL_SPECS, SHIPPED

CARD_FIELDS = {"config", "data_seed", "command", "wall_time_s", "accuracy", "train_config"}


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request, load_model):
    card = json.loads((Path(MODEL_SPECS[request.param].checkpoint) / "card.json").read_text())
    return load_model(request.param), card


def test_card_documents_the_training_run(shipped):
    codi, card = shipped
    assert CARD_FIELDS <= set(card)
    assert card["command"].startswith("python -m harness train")
    assert card["config"]["model_type"] == codi.arch.model_type
    assert card["train_config"]["n_latent"] == codi.n_latent == 6


def test_card_matches_a_fresh_evaluation(shipped, synthetic_test):
    codi, card = shipped
    acc = card["accuracy"]
    latent = evaluate(codi, synthetic_test, progress=False)
    assert latent.accuracy == pytest.approx(acc["latent"], abs=1e-9)
    assert {str(k): v for k, v in latent.accuracy_by_steps().items()} == pytest.approx(acc["latent_by_steps"])
    patched = evaluate(codi, synthetic_test, patch=mean_patch(thought_means(codi, synthetic_test)), progress=False)
    assert patched.accuracy == pytest.approx(acc["latent_mean_patched"], abs=1e-9)
    assert teacher_accuracy(codi, synthetic_test) == pytest.approx(acc["teacher_cot"], abs=1e-9)
