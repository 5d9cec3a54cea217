"""Named positions: the one place that maps (problem, name) to a sequence index.

Layout of a left-padded batch of width T (question + bot) with K thoughts:

    [pad ... pad | question tokens | bot | CT0 ... CT{K-1} | eot | answer tokens ...]
                   P_b ..  T-2       T-1   T ..   T+K-1      T+K   T+K+1 ..

The question span depends on the row (its padding); bot, the thoughts and eot do not.
Interventions, probes and discovery all take their indices from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CT = re.compile(r"CT(\d+)")


class PositionError(ValueError):
    """An unknown position name."""


# names a claim or spec may use: the K thoughts one by one, every thought (`latent`), the bot
# and eot tokens, the question tokens, the generated (or teacher-forced) answer tokens
NAMED_SPANS = ("latent", "bot", "eot", "question", "answer")
FIXED = ("bot", "eot")  # one index, the same for every row


def check_position(name: str, n_latent: int) -> None:
    """`name` is a position a model with `n_latent` thoughts has; else a `PositionError`."""
    match = _CT.fullmatch(name)
    if name in NAMED_SPANS or (match and int(match.group(1)) < n_latent):
        return
    raise PositionError(f"unknown position {name!r}; choose from CT0..CT{n_latent - 1}, {', '.join(NAMED_SPANS)}")


def thought_number(name: str) -> int | None:
    """i for `CT<i>` (any i: the model's K is checked by `check_position`), else None."""
    match = _CT.fullmatch(name)
    return int(match.group(1)) if match else None


def is_fixed(name: str) -> bool:
    """One index per name, the same in every row (bot, CT<i>, eot, and `latent` = the thoughts)."""
    return name in FIXED or name == "latent" or bool(_CT.fullmatch(name))


@dataclass(frozen=True)
class PositionMap:
    width: int  # T: padded question + bot
    n_latent: int  # K
    question_lengths: tuple[int, ...]  # per row

    @property
    def names(self) -> list[str]:
        """The single-index names, in sequence order."""
        return ["bot", *(f"CT{i}" for i in range(self.n_latent)), "eot"]

    @property
    def latent(self) -> list[int]:
        """Indices of CT0..CT{K-1}: the default positions of an intervention."""
        return [self.width + i for i in range(self.n_latent)]

    def index(self, name: str) -> int:
        """Sequence index of `bot`, `CT<i>` or `eot` (the same for every row)."""
        if name == "bot":
            return self.width - 1
        if name == "eot":
            return self.width + self.n_latent
        match = _CT.fullmatch(name)
        if match and int(match.group(1)) < self.n_latent:
            return self.width + int(match.group(1))
        raise PositionError(f"unknown position {name!r}; known: question, {', '.join(self.names)}, answer")

    def question(self, row: int) -> range:
        """Indices of row's question tokens (tokenizer specials included)."""
        end = self.width - 1
        return range(end - self.question_lengths[row], end)

    def answer(self, n_tokens: int) -> range:
        """Indices of the first `n_tokens` generated tokens (fed after eot)."""
        start = self.width + self.n_latent + 1
        return range(start, start + n_tokens)

    def resolve(self, names: tuple[str, ...] | list[str], max_answer: int = 1024) -> list[int]:
        """Sorted sequence indices of named positions. `question` is every index before bot: left
        padding included, which no query attends to, so acting there changes nothing; `answer`
        is the first `max_answer` tokens after eot."""
        out: set[int] = set()
        for name in names:
            if name == "latent":
                out.update(self.latent)
            elif name == "question":
                out.update(range(self.width - 1))
            elif name == "answer":
                out.update(self.answer(max_answer))
            else:
                out.add(self.index(name))
        return sorted(out)

    def thought_index(self, name: str) -> int:
        """i for `CT<i>` (for thought-level interventions)."""
        if not _CT.fullmatch(name):
            raise PositionError(f"{name!r} is not a continuous thought; choose CT0..CT{self.n_latent - 1}")
        return self.index(name) - self.width
