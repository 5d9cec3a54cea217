"""Counterfactual problems from the solution annotations: one generator for every data set whose
solutions carry calculator steps (`<<16-3-4=9>> <<9*2=18>>`: GSM8K, the synthetic problems, any
`.jsonl` in that format).

A pair changes one number of the question that the annotated chain uses and recomputes every
step in order, earlier results flowing into later steps; the source then carries its answer and
every intermediate value, which interchange, learned subspaces and path patching read. A pair
is kept only when the change is unambiguous, and a problem left out says why (`REASONS`):

- the chain recomputes exactly to its own annotations (rounded steps are not replayed);
- the gold answer is one of the chain's results (the last such step is the answer);
- the changed number occurs once in the question, is used by exactly one operand of the chain,
  and that operand is not also an earlier result (a value that also serves as a constant, e.g.
  the 2 of "half", or as an intermediate cannot be told apart from it: reject, never guess);
- every step keeps its kind (an integer stays an integer, a non-negative value non-negative,
  within `max_value` where the data set has a vocabulary bound) and the answer changes.

Arithmetic is exact (fractions), so a recomputed step equals its annotation or it does not.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from dataclasses import dataclass, replace
from fractions import Fraction

from harness.data.problems import Problem

# Why a problem has no pair, in the order a candidate gets further: a problem is rejected with
# the furthest stage any of its candidate changes reached.
REASONS = (
    "no annotated steps",
    "an annotation is not plain arithmetic",
    "the chain does not recompute to its annotations",
    "the answer is not a result of the chain",
    "no question number is an operand of the chain",
    "the number occurs more than once in the question",
    "the number is also a constant or an intermediate of the chain",
    "a step changes kind (integer, non-negative, in range)",
    "the answer does not change",
)
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_OPERAND = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?|\.\d+)")  # unsigned: a leading minus is an operator
_QUESTION_NUMBER = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,]*\d)|(?<![\d.,])\d+(?:\.\d+)?(?![\d.]*\d)")
OFFSETS = tuple(d for d in range(-10, 11) if d)  # new values: the old one plus one of these


@dataclass(frozen=True)
class Step:
    """One annotated step: the expression's text with its operands' spans, and its result."""

    text: str  # e.g. "16-3-4"
    operands: tuple[tuple[int, int, Fraction], ...]  # (start, end, value) of each number in `text`
    result: Fraction
    spaced: bool  # "<< 5 + 3 = 8 >>" (synthetic) rather than "<<5+3=8>>" (GSM8K)

    def evaluate(self, values: list[Fraction]) -> Fraction:
        """The expression with its operands replaced by `values`, in exact arithmetic."""
        return _evaluate(ast.parse(self.with_values(values), mode="eval").body)

    def with_values(self, values: list[Fraction]) -> str:
        out, last = [], 0
        for (start, end, _), v in zip(self.operands, values):
            out += [self.text[last:start], format_value(v)]
            last = end
        return "".join(out) + self.text[last:]

    def annotation(self, values: list[Fraction], result: Fraction) -> str:
        pad = " " if self.spaced else ""
        return f"<<{pad}{self.with_values(values)}{pad}={pad}{format_value(result)}{pad}>>"


@dataclass(frozen=True)
class Pair:
    """A base problem and its counterfactual source: the question with one number changed
    (`changed`: its text before and after), the chain recomputed (`source.cot`), its answer.
    `steps` are the source's recomputed step results, in order."""

    base: Problem
    source: Problem
    changed: tuple[str, str]
    steps: tuple[float, ...]


@dataclass(frozen=True)
class Counterfactuals:
    """Pairs for the problems that have one, and the reason for each that has not."""

    pairs: list[Pair]
    rejected: dict[str, str]  # problem id -> reason (one of REASONS)
    problems: int

    @property
    def coverage(self) -> float:
        return len(self.pairs) / self.problems if self.problems else 0.0

    def reasons(self) -> dict[str, int]:
        """Rejections by reason, in `REASONS` order."""
        counts = Counter(self.rejected.values())
        return {r: counts[r] for r in REASONS if counts[r]}


class _Reject(Exception):
    def __init__(self, stage: int) -> None:
        self.stage = stage


def format_value(v: Fraction) -> str:
    """A value as annotations write it: 9, 1.5, 0.25 (exact decimals; others to 6 places)."""
    if v.denominator == 1:
        return str(v.numerator)
    text = f"{float(v):.6f}".rstrip("0")
    return text[:-1] if text.endswith(".") else text


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
        a, b = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if b == 0:
            raise ZeroDivisionError
        return a / b
    raise ValueError("not plain arithmetic")


def parse_steps(cot: str) -> list[Step]:
    """The annotated steps of a solution; ValueError where one is not plain arithmetic."""
    steps = []
    for body in _ANNOTATION.findall(cot):
        expression, sep, result = body.rpartition("=")
        text = expression.strip()
        plain = re.fullmatch(r"[\d.+\-*/() ]+", text) and re.fullmatch(r"\s*-?[\d.]+\s*", result)
        if not sep or not text or not plain:
            raise ValueError(body)
        operands = tuple((m.start(), m.end(), Fraction(m.group())) for m in _OPERAND.finditer(text))
        try:
            _evaluate(ast.parse(text, mode="eval").body)
            value = Fraction(result.strip())
        except (SyntaxError, ValueError, ZeroDivisionError):
            raise ValueError(body) from None
        steps.append(Step(text, operands, value, spaced=body.startswith(" ")))
    return steps


def question_numbers(question: str) -> list[tuple[int, int, Fraction]]:
    """(start, end, value) of every number written in digits in the question ("80,000" is one)."""
    return [(m.start(), m.end(), Fraction(m.group().replace(",", ""))) for m in _QUESTION_NUMBER.finditer(question)]


def _links(steps: list[Step]) -> list[list[int | None]]:
    """For each operand, the earlier step whose result it is (the latest such), else None."""
    links = []
    for j, step in enumerate(steps):
        earlier = {s.result: i for i, s in enumerate(steps[:j])}
        links.append([earlier.get(value) for _, _, value in step.operands])
    return links


def _ambiguous_links(steps: list[Step], results: list[Fraction], question: Counter) -> bool:
    """Whether an operand that changes with an earlier result might not be that result: its
    value is also a question number or a constant of the chain (an operand that is neither, e.g.
    the 2 of "half"), or several earlier steps had it and now differ."""
    links = _links(steps)
    constants = {
        value
        for j, step in enumerate(steps)
        for o, (_, _, value) in enumerate(step.operands)
        if links[j][o] is None and not question[value]
    }
    for j, step in enumerate(steps):
        for _, _, value in step.operands:
            same = [i for i in range(j) if steps[i].result == value]
            changed = {results[i] for i in same} - {value}
            if changed and (question[value] or value in constants or len({results[i] for i in same}) > 1):
                return True
    return False


def recompute(steps: list[Step], changed: tuple[int, int] | None, new: Fraction | None) -> list[Fraction]:
    """Every step's result with operand `changed` (step, operand index) set to `new` and each
    operand that is an earlier result taking that step's recomputed value."""
    links, results = _links(steps), []
    for j, step in enumerate(steps):
        values = []
        for o, (_, _, value) in enumerate(step.operands):
            if changed == (j, o):
                value = new
            elif links[j][o] is not None:
                value = results[links[j][o]]
            values.append(value)
        results.append(step.evaluate(values))
    return results


def _source_cot(steps: list[Step], changed: tuple[int, int], new: Fraction, results: list[Fraction]) -> str:
    links, parts = _links(steps), []
    for j, step in enumerate(steps):
        values = [
            new if changed == (j, o) else results[links[j][o]] if links[j][o] is not None else value
            for o, (_, _, value) in enumerate(step.operands)
        ]
        parts.append(step.annotation(values, results[j]))
    return " ".join(parts)


def _sign(x: Fraction) -> int:
    return (x > 0) - (x < 0)


def _keeps_kind(old: Fraction, new: Fraction, max_value: Fraction | None) -> bool:
    """An integer stays an integer, a positive value positive (a count of 0 reads oddly in a
    question), zero zero, and values stay within the data set's range."""
    if old.denominator == 1 and new.denominator != 1:
        return False
    if _sign(old) != _sign(new) and not (old < 0 and new < 0):
        return False
    return max_value is None or abs(new) <= max_value


def _write_like(text: str, value: Fraction) -> str:
    """`value` written as `text` writes its number: thousands separators, decimal places."""
    if "." in text:
        places = len(text.split(".")[1])
        return f"{float(value):.{places}f}"
    written = str(value.numerator)
    return f"{value.numerator:,}" if "," in text else written


def counterfactual(problem: Problem, rng: random.Random, max_value: Fraction | None = None) -> Pair:
    """`problem`'s counterfactual: raises `_Reject` with the furthest stage a candidate reached."""
    if not _ANNOTATION.search(problem.cot):
        raise _Reject(0)
    try:
        steps = parse_steps(problem.cot)
    except ValueError:
        raise _Reject(1) from None
    if recompute(steps, None, None) != [s.result for s in steps]:
        raise _Reject(2)
    answers = [j for j, s in enumerate(steps) if s.result == Fraction(str(problem.answer))]
    if not answers:
        raise _Reject(3)
    answer_step = answers[-1]
    numbers = question_numbers(problem.question)
    in_question = Counter(v for _, _, v in numbers)
    links = _links(steps)
    uses = Counter(value for step in steps for _, _, value in step.operands)
    candidates = [n for n in numbers if uses[n[2]]]
    rng.shuffle(candidates)
    stage = 4
    for start, end, value in candidates:
        if in_question[value] > 1:
            stage = max(stage, 5)
            continue
        at = [(j, o) for j, s in enumerate(steps) for o, (_, _, v) in enumerate(s.operands) if v == value]
        if len(at) != 1 or links[at[0][0]][at[0][1]] is not None:
            stage = max(stage, 6)
            continue
        for offset in rng.sample(OFFSETS, len(OFFSETS)):
            new = value + offset
            try:
                results = recompute(steps, at[0], new)
            except ZeroDivisionError:
                stage = max(stage, 7)
                continue
            if _ambiguous_links(steps, results, in_question):
                stage = max(stage, 6)
                continue
            kinds = [_keeps_kind(value, new, max_value)] + [
                _keeps_kind(s.result, r, max_value) for s, r in zip(steps, results)
            ]
            if not all(kinds):
                stage = max(stage, 7)
                continue
            if results[answer_step] == steps[answer_step].result:
                stage = max(stage, 8)
                continue
            old_text = problem.question[start:end]
            new_text = _write_like(old_text, new)
            source = replace(
                problem,
                id=f"{problem.id}-cf",
                question=problem.question[:start] + new_text + problem.question[end:],
                cot=_source_cot(steps, at[0], new, results),
                answer=float(results[answer_step]),
            )
            return Pair(problem, source, (old_text, new_text), tuple(float(r) for r in results))
    raise _Reject(stage)


def value_range(problems: list[Problem]) -> Fraction | None:
    """The largest magnitude with as many digits as the largest any parsable annotation of
    `problems` uses: a counterfactual stays within its data set's range (the synthetic problems
    use 0..99 and their vocabulary ends at 199)."""
    values = []
    for p in problems:
        try:
            values += [abs(v) for s in parse_steps(p.cot) for v in (s.result, *(o[2] for o in s.operands))]
        except ValueError:
            continue
    return Fraction(10 ** len(str(int(max(values)))) - 1) if values else None


def counterfactuals(problems: list[Problem], seed: int = 0) -> Counterfactuals:
    """Every problem's counterfactual source, or the reason it has none. Seeded per problem: the
    same problem, seed and data set give the same pair."""
    pairs, rejected, max_value = [], {}, value_range(problems)
    for p in problems:
        rng = random.Random(f"{seed}:{p.id}")  # a problem's pair does not depend on the others
        try:
            pairs.append(counterfactual(p, rng, max_value))
        except _Reject as r:
            rejected[p.id] = REASONS[r.stage]
    return Counterfactuals(pairs, rejected, len(problems))
