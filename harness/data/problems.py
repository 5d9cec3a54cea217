"""Problems: the GSM8K test set and a synthetic GSM8K-style arithmetic generator.

A `Problem` carries the question, its chain of thought (GSM8K-Aug style `<<a*b=c>>` steps),
the gold number and the number of reasoning steps. Everything downstream (training,
evaluation, claims) consumes `Problem`s, whatever their source.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # holds harness/ and the shipped fixtures/
# Where generated files (reports/, .cache/results/) and the default registry live: the checkout
# itself when run from one (pyproject.toml beside harness/); for an installed package, the
# researcher's project, the working directory, never site-packages.
WORK_ROOT = PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").is_file() else Path.cwd()
GSM8K_PATH = PROJECT_ROOT / "fixtures" / "data" / "gsm8k" / "test.jsonl"

ANSWER_PREFIX = "answer is :"
_NUMBER = re.compile(r"-?\d+\.?\d*")


class DataError(ValueError):
    """A data source that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    cot: str  # chain of thought, e.g. "<< 12 + 5 = 17 >> << 17 - 3 = 14 >>"
    answer: float  # gold number
    n_steps: int  # reasoning steps in the gold solution

    @property
    def answer_text(self) -> str:
        return f"{ANSWER_PREFIX} {format_number(self.answer)}"


def data_hash(problems: list[Problem]) -> str:
    """The data part of a cache key: a hash of every problem's id, question and answer."""
    h = hashlib.sha256()
    for p in problems:
        h.update(f"{p.id}\t{p.question}\t{p.answer}\n".encode())
    return h.hexdigest()[:16]


def format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def parse_answer(text: str) -> float | None:
    """The last number in `text` (commas removed), as the CODI reference scores answers."""
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:
        return None


def is_correct(pred: float | None, gold: float) -> bool:
    return pred is not None and abs(pred - gold) < 1e-6


# --- GSM8K ------------------------------------------------------------------------------


def normalise_question(text: str) -> str:
    """The question as the official CODI evaluator feeds it: stripped, and each run of two
    spaces made one (a single pass, as `.replace('  ', ' ')` does: four spaces become two)."""
    return text.strip().replace("  ", " ")


def _gsm8k_problem(row: dict, index: int, where: str) -> Problem:
    if not isinstance(row, dict) or "question" not in row or "answer" not in row:
        raise DataError(f"{where}: expected an object with 'question' and 'answer'")
    solution, sep, gold = str(row["answer"]).rpartition("####")
    gold_value = parse_answer(gold) if sep else None
    if gold_value is None:
        raise DataError(f"{where}: no gold number after '####' in the answer")
    steps = re.findall(r"<<[^>]*>>", solution)
    n_steps = len(steps) or max(1, len([ln for ln in solution.splitlines() if ln.strip()]))
    return Problem(
        id=f"gsm8k-{index}",
        question=normalise_question(str(row["question"])),
        cot=" ".join(steps),
        answer=gold_value,
        n_steps=n_steps,
    )


def load_jsonl(path: str | Path) -> list[Problem]:
    """GSM8K-format jsonl (`question`, `answer` with the gold after `####`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    problems = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            problems.append(_gsm8k_problem(row, len(problems), f"{path}:{lineno}"))
    if not problems:
        raise DataError(f"{path}: no problems in the file")
    return problems


def load_gsm8k() -> list[Problem]:
    """The shipped GSM8K test set (1,319 problems, MIT licence)."""
    return load_jsonl(GSM8K_PATH)


def load_hf_dataset(name: str, split: str = "test") -> list[Problem]:
    """A `datasets` id in GSM8K format (needs the dataset locally cached or a network)."""
    try:
        import datasets  # optional: only for hub ids
    except ImportError:
        raise DataError(f"{name!r} is not a file; loading a datasets id needs `pip install datasets`") from None
    try:
        rows = datasets.load_dataset(name, "main", split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one usage line
        raise DataError(f"cannot load dataset {name!r} ({type(e).__name__}); pass a local .jsonl path") from None
    return [_gsm8k_problem(row, i, f"{name}[{i}]") for i, row in enumerate(rows)]


# --- synthetic GSM8K-style arithmetic -----------------------------------------------------

NAMES = ("Tom", "Anna", "Liam", "Mia", "Noah", "Emma", "Omar", "Sara", "Ravi", "Lena", "Ivan", "Zoe")
ITEMS = ("apples", "marbles", "stickers", "cookies", "books", "coins", "shells", "pencils")
MAX_VALUE = 99
MAX_START = 40

# operation -> (wordings, result function, validity check, CoT operator and operand)
_ADD = ("buys {k} more {item} .", "finds {k} more {item} .", "gets {k} more {item} from a friend .")
_SUB = ("gives away {k} {item} .", "loses {k} {item} .", "uses {k} of the {item} .")
_DOUBLE = ("doubles the {item} .", "then has twice as many {item} .")
_TRIPLE = ("triples the {item} .", "then has three times as many {item} .")
_HALF = ("gives half of the {item} away .", "keeps half of the {item} .")
_OPENINGS = (
    "{name} has {a} {item} .",
    "{name} starts with {a} {item} .",
    "there are {a} {item} in the box of {name} .",
)
_QUESTIONS = (
    "how many {item} does {name} have now ?",
    "how many {item} are left ?",
    "what is the number of {item} now ?",
)
_PRONOUNS = {"Tom": "he", "Liam": "he", "Noah": "he", "Omar": "he", "Ravi": "he", "Ivan": "he"}


def _step(rng: random.Random, x: int) -> tuple[tuple[str, ...], str, int, int]:
    """One random valid operation on x: (wordings, operator, operand, result)."""
    ops = []
    k = rng.randint(1, 9)
    if x + k <= MAX_VALUE:
        ops.append((_ADD, "+", k, x + k))
    if x - k >= 0:
        ops.append((_SUB, "-", k, x - k))
    if 2 * x <= MAX_VALUE and x > 1:
        ops.append((_DOUBLE, "*", 2, 2 * x))
    if 3 * x <= MAX_VALUE and x > 1:
        ops.append((_TRIPLE, "*", 3, 3 * x))
    if x % 2 == 0 and x > 0:
        ops.append((_HALF, "/", 2, x // 2))
    return rng.choice(ops)


def synthetic_problem(rng: random.Random, n_steps: int, pid: str) -> Problem:
    """A word problem of `n_steps` chained operations on one quantity, all values 0..99."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    pronoun = _PRONOUNS.get(name, "she")
    x = rng.randint(2, MAX_START)
    sentences = [rng.choice(_OPENINGS).format(name=name, a=x, item=item)]
    cot = []
    for i in range(n_steps):
        wordings, op, k, y = _step(rng, x)
        subject = name if i == 0 else pronoun
        sentences.append(f"{subject} " + rng.choice(wordings).format(k=k, item=item))
        cot.append(f"<< {x} {op} {k} = {y} >>")
        x = y
    sentences.append(rng.choice(_QUESTIONS).format(name=name, item=item))
    return Problem(id=pid, question=" ".join(sentences), cot=" ".join(cot), answer=float(x), n_steps=n_steps)


def synthetic_vocabulary() -> list[str]:
    """Every word the synthetic generator can emit, in a fixed order (for the tiny tokenizer)."""
    words: list[str] = [str(i) for i in range(MAX_VALUE + 1)]
    templates = _ADD + _SUB + _DOUBLE + _TRIPLE + _HALF + _OPENINGS + _QUESTIONS
    text = " ".join(templates) + " " + ANSWER_PREFIX + " << >> + - * / = he she"
    for w in text.replace("{name}", " ").replace("{item}", " ").replace("{k}", " ").replace("{a}", " ").split():
        if w not in words:
            words.append(w)
    return words + [w for w in NAMES + ITEMS if w not in words]


SPLIT_SEEDS = {"test": 1_000_003, "discovery": 2_000_003}
SPLIT_SIZES = {"test": 1000, "discovery": 300}
MAX_STEPS = 4


def _split(name: str, seed: int, size: int) -> list[Problem]:
    rng = random.Random(seed)
    return [synthetic_problem(rng, 1 + i % MAX_STEPS, f"{name}-{i}") for i in range(size)]


def synthetic_split(name: str, data_seed: int = 0) -> list[Problem]:
    """Held-out splits: 'test' (1,000 problems) and 'discovery' (300), disjoint by question."""
    if name not in SPLIT_SEEDS:
        raise DataError(f"unknown synthetic split {name!r}; choose from {sorted(SPLIT_SEEDS)}")
    problems = _split(name, SPLIT_SEEDS[name] + data_seed, SPLIT_SIZES[name])
    if name == "discovery":
        test_questions = {p.question for p in synthetic_split("test", data_seed)}
        problems = [p for p in problems if p.question not in test_questions]
    return problems


def synthetic_training_stream(seed: int, data_seed: int = 0):
    """Endless training problems (1-4 steps), never a question of the held-out splits."""
    held_out = {p.question for split in SPLIT_SEEDS for p in synthetic_split(split, data_seed)}
    rng = random.Random(seed)
    i = 0
    while True:
        p = synthetic_problem(rng, rng.randint(1, MAX_STEPS), f"train-{i}")
        i += 1
        if p.question not in held_out:
            yield p


def load_problems(data: str, n: int | None = None, split: str = "test", option: str = "--n") -> list[Problem]:
    """Resolve a `--data` value: 'synthetic', 'gsm8k', a jsonl path, or a `datasets` id; the
    first `n` problems (`option` names the flag in the error when `n` is out of range)."""
    if data == "synthetic":
        problems = synthetic_split(split)
    elif data == "gsm8k":
        problems = load_gsm8k()
    elif Path(data).suffix == ".jsonl" or Path(data).exists():
        problems = load_jsonl(data)
    else:
        problems = load_hf_dataset(data)
    if n is not None:
        if n <= 0:
            raise DataError(f"{option} must be positive, got {n}")
        if n > len(problems):
            raise DataError(f"{option} {n} is larger than the data set ({len(problems)} problems in {data!r})")
        problems = problems[:n]
    return problems


DISCOVERY_SIZE = 200  # outside the synthetic data: the last problems of the file


def held_out_splits(data: str, n: int | None = None) -> tuple[list[Problem], list[Problem]]:
    """(test problems, discovery problems), disjoint. Synthetic data has its own discovery
    split; for a file (or GSM8K) it is the file's last `DISCOVERY_SIZE` problems."""
    if data == "synthetic":
        return load_problems(data, n, option="--n-problems"), synthetic_split("discovery")
    everything = load_problems(data)
    room = len(everything) - DISCOVERY_SIZE
    n = room if n is None else n
    if n <= 0 or n > room:
        raise DataError(
            f"--n-problems {n} is out of range for {data!r}: 1 to {room}, so that the discovery split "
            f"(its last {DISCOVERY_SIZE} of {len(everything)} problems) stays disjoint"
        )
    return everything[:n], everything[-DISCOVERY_SIZE:]
