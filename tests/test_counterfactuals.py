"""Counterfactual pairs from the solution annotations (`harness/data/counterfactuals.py`),
checked by an independent reading of every pair: floats and Python's own arithmetic, the
question compared as text around its numbers."""

from __future__ import annotations

import json
import random
import re

import pytest

from harness.commands.cli import main
from harness.data.counterfactuals import REASONS, counterfactual, counterfactuals, parse_steps, recompute
from harness.data.problems import Problem, load_gsm8k, synthetic_split

GSM8K = load_gsm8k()
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?")
_ANNOTATION = re.compile(r"<<\s*([^=<>]+?)\s*=\s*([-\d.]+)\s*>>")


def _split_numbers(text: str) -> tuple[list[str], list[str]]:
    """(the text between numbers, the numbers) of a question."""
    return _NUMBER.split(text), _NUMBER.findall(text)


def _chain(cot: str) -> list[tuple[list[float], float, float]]:
    """Each annotation as (its operands, its expression's value, its written result)."""
    out = []
    for expression, result in _ANNOTATION.findall(cot):
        operands = [float(x) for x in re.findall(r"\d+(?:\.\d+)?|\.\d+", expression)]
        out.append((operands, eval(expression, {"__builtins__": {}}), float(result)))  # noqa: S307 - digits and + - * / ( )
    return out


def check_pair(base: Problem, source: Problem, changed: tuple[str, str]) -> None:
    """A valid pair: the questions differ in one number (`changed`) and nothing else; the source
    chain computes to its own annotations, carries each earlier result the base chain used into
    the same place, differs from the base chain in one other operand (the changed number), and
    ends in a different answer."""
    (base_text, base_numbers), (source_text, source_numbers) = map(_split_numbers, (base.question, source.question))
    assert base_text == source_text
    differ = [(a, b) for a, b in zip(base_numbers, source_numbers) if a != b]
    assert differ == [changed], (base.question, source.question)
    old, new = (float(x.replace(",", "")) for x in changed)
    base_chain, source_chain = _chain(base.cot), _chain(source.cot)
    assert len(base_chain) == len(source_chain)
    moved = 0
    for j, ((b_ops, _, _), (s_ops, s_value, s_result)) in enumerate(zip(base_chain, source_chain)):
        assert abs(s_value - s_result) < 1e-6 * max(1.0, abs(s_result)), source.cot
        assert len(b_ops) == len(s_ops)
        for b, s in zip(b_ops, s_ops):
            earlier = [i for i in range(j) if base_chain[i][2] == b]
            if earlier:  # an earlier result: the source's result of that step, carried
                assert s == source_chain[earlier[-1]][2], (base.cot, source.cot)
            elif b != s:
                assert (b, s) == (old, new), (base.cot, source.cot)
                moved += 1
    assert moved == 1, (base.cot, source.cot)
    assert source.answer in [r for _, _, r in source_chain] and source.answer != base.answer


def test_every_annotated_gsm8k_chain_recomputes_to_its_own_annotations():
    parsed = 0
    for p in GSM8K:
        try:
            steps = parse_steps(p.cot)
        except ValueError:
            continue
        parsed += bool(steps)
        assert recompute(steps, None, None) == [s.result for s in steps], p.cot
    assert parsed >= 1300


def test_most_gsm8k_problems_are_paired_and_every_pair_is_valid():
    made = counterfactuals(GSM8K, seed=0)
    assert made.coverage >= 0.6 and made.problems == 1319
    assert len(made.pairs) + len(made.rejected) == 1319 and set(made.reasons()) <= set(REASONS)
    for pair in made.pairs:
        check_pair(pair.base, pair.source, pair.changed)
        assert list(pair.steps) == [r for _, _, r in _chain(pair.source.cot)]


@pytest.mark.parametrize("split", ["test", "discovery"])
def test_synthetic_pairs_are_valid_and_stay_in_the_vocabulary(split):
    made = counterfactuals(synthetic_split(split), seed=0)
    assert made.coverage > 0.9
    for pair in made.pairs:
        check_pair(pair.base, pair.source, pair.changed)
        assert all(0 <= v <= 99 for v in pair.steps)


def test_pairs_are_seeded_per_problem():
    a, b = counterfactuals(GSM8K[:50], seed=0), counterfactuals(GSM8K[:50], seed=0)
    assert [p.source for p in a.pairs] == [p.source for p in b.pairs]
    assert [p.source for p in counterfactuals(GSM8K[:50], seed=1).pairs] != [p.source for p in a.pairs]


def _problem(question: str, cot: str, answer: float) -> Problem:
    return Problem("x", question, cot, answer, cot.count("<<"))


REJECTED = [
    (_problem("Tom has 5 apples.", "", 5), "no annotated steps"),
    (_problem("Tom has 5 apples.", "<<sqrt(25)=5>>", 5), "an annotation is not plain arithmetic"),
    (
        _problem("Tom has 10 apples and eats 3.", "<<10/3=3.33>>", 3.33),
        "the chain does not recompute to its annotations",
    ),
    (_problem("Tom has 5 apples and buys 3.", "<<5+3=8>>", 9), "the answer is not a result of the chain"),
    (_problem("Tom has five apples and buys three.", "<<5+3=8>>", 8), "no question number is an operand of the chain"),
    (_problem("Tom has 4 apples and buys 4 more.", "<<4+4=8>>", 8), "the number occurs more than once in the question"),
    # 2 is the question's number and the constant of "half": which 2 to change is a guess
    (
        _problem("Tom has 2 apples and eats half of them.", "<<2/2=1>>", 1),
        "the number is also a constant or an intermediate of the chain",
    ),
    # 6 - 5 = 1 is the chain's result, then multiplied by the question's 1: ambiguous
    (
        _problem("Tom has 6 apples, eats 5 and keeps 1 box of them.", "<<6-5=1>> <<1*1=1>>", 1),
        "the number is also a constant or an intermediate of the chain",
    ),
    # 46 / 23: no other numerator or divisor within 10 of them divides evenly
    (
        _problem("Tom shares 46 apples among 23 friends.", "<<46/23=2>>", 2),
        "a step changes kind (integer, non-negative, in range)",
    ),
    (_problem("Tom has 7 boxes with 0 apples.", "<<7*0=0>>", 0), "the answer does not change"),
]


@pytest.mark.parametrize(("problem", "reason"), REJECTED, ids=[r for _, r in REJECTED])
def test_each_rejection_reason_is_given_where_it_applies(problem, reason):
    assert counterfactuals([problem]).rejected == {"x": reason}


def test_a_constant_equal_to_a_question_number_is_never_changed():
    """The question's 2 is an operand once; the chain's other 2 ("two more") is a constant:
    changing the 2 would be a guess, so the pair changes the 6."""
    problem = _problem("A box holds 6 eggs. Sam buys 2 boxes and gets two more eggs.", "<<6*2=12>> <<12+2=14>>", 14)
    for seed in range(30):
        pair = counterfactual(problem, random.Random(seed))
        assert pair.changed[0] == "6"
        check_pair(problem, pair.source, pair.changed)


def test_a_changed_value_flows_into_every_later_step():
    problem = _problem("Ann has 16 eggs, eats 3 and sells the rest at $2.", "<<16-3=13>> <<13*2=26>>", 26)
    pair = counterfactual(problem, random.Random(0))
    check_pair(problem, pair.source, pair.changed)
    new = int(pair.changed[1]) if pair.changed[0] == "16" else 16
    if pair.changed[0] == "16":
        assert pair.source.cot == f"<<{new}-3={new - 3}>> <<{new - 3}*2={(new - 3) * 2}>>"


def test_the_checker_catches_an_uncarried_value_and_a_replaced_constant():
    base = _problem("Ann has 16 eggs, eats 3 and sells the rest at $2.", "<<16-3=13>> <<13*2=26>>", 26)
    uncarried = _problem("Ann has 17 eggs, eats 3 and sells the rest at $2.", "<<17-3=14>> <<13*2=26>>", 26)
    with pytest.raises(AssertionError):
        check_pair(base, uncarried, ("16", "17"))
    base = _problem("A box holds 6 eggs. Sam buys 2 boxes and gets two more eggs.", "<<6*2=12>> <<12+2=14>>", 14)
    both = _problem("A box holds 6 eggs. Sam buys 3 boxes and gets two more eggs.", "<<6*3=18>> <<18+3=21>>", 21)
    with pytest.raises(AssertionError):
        check_pair(base, both, ("2", "3"))


def test_the_command_reports_coverage_rejections_and_pairs(capsys):
    assert main(["counterfactuals", "--data", "gsm8k", "--n-problems", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    made = counterfactuals(GSM8K[:40], seed=0)
    assert out["problems"] == 40 and out["coverage"] == made.coverage and out["rejected"] == made.reasons()
    assert len(out["pairs"]) == len(made.pairs) and sum(out["rejected"].values()) + len(out["pairs"]) == 40
    first = out["pairs"][0]
    assert set(first) == {"base_id", "base_question", "base_answer", "source_question", "source_cot", "source_answer",
                          "changed"}  # fmt: skip
    assert first["changed"]["from"] in first["base_question"] and first["changed"]["to"] in first["source_question"]
    assert main(["counterfactuals", "--data", "gsm8k", "--n-problems", "20"]) == 0
    assert "of 20 problems paired" in capsys.readouterr().out
    assert main(["counterfactuals", "--data", "nowhere.jsonl"]) == 4
