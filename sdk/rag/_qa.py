"""A seeded, generated multi-document QA set: fictional companies and towns, each
described by one document (every fact is stated once, in one place), questions that need
one fact or two (a company's headquarters town, then that town's mayor), and distractor
documents about other companies and towns around the ones a question needs.

The world is invented, so a model cannot answer from what it memorised: an answer is
right only if it was read from the documents.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io"]
_CODAS = ["", "n", "r", "l", "s", "m", "th", "nd", "x"]
_PRODUCTS = [
    "bicycles", "pianos", "umbrellas", "telescopes", "tea kettles", "wool blankets", "clocks", "garden tools",
    "kayaks", "violins", "lanterns", "typewriters", "sailcloth", "copper pans", "chess sets", "rope",
]  # fmt: skip
_FEATURES = [
    "stone bridge", "spring fair", "clock tower", "salt mines", "glass workshops", "rose gardens",
    "old lighthouse", "cheese market", "hot springs", "paper mill", "horse races", "winter lanterns",
]  # fmt: skip


@dataclass(frozen=True)
class Question:
    """One question: its retrieved documents in prompt order, the gold answer, its kind
    (``single`` or ``two-fact``), which documents state the facts it needs, and the
    company it asks about."""

    docs: list[str]
    question: str
    answer: str
    kind: str
    needed: list[int]
    subject: str


@dataclass(frozen=True)
class _Company:
    name: str
    product: str
    year: int
    founder: str
    town: int

    def text(self, towns: list[_Town]) -> str:
        return (
            f"{self.name} is a company that makes {self.product}. It was founded in {self.year} by "
            f"{self.founder}. The headquarters of {self.name} are in the town of {towns[self.town].name}."
        )


@dataclass(frozen=True)
class _Town:
    name: str
    river: str
    mayor: str
    feature: str

    def text(self) -> str:
        return (
            f"{self.name} is a town on the river {self.river}. The mayor of {self.name} is {self.mayor}. "
            f"{self.name} is known for its {self.feature}."
        )


class World:
    """``companies`` and ``towns`` with unique names, drawn from ``seed``."""

    def __init__(self, seed: int, companies: int = 240, towns: int = 120) -> None:
        rng = random.Random(seed)
        used: set[str] = set()

        def word(syllables: int) -> str:
            while True:
                w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
                w = w.capitalize()
                if w not in used and 4 <= len(w) <= 11:
                    used.add(w)
                    return w

        def person() -> str:
            return f"{word(2)} {word(2)}"

        self.towns = [_Town(word(2), word(2), person(), rng.choice(_FEATURES)) for _ in range(towns)]
        self.companies = [
            _Company(word(3), rng.choice(_PRODUCTS), rng.randrange(1850, 2000), person(), rng.randrange(towns))
            for _ in range(companies)
        ]

    def company_doc(self, i: int) -> str:
        return self.companies[i].text(self.towns)

    def town_doc(self, i: int) -> str:
        return self.towns[i].text()


@functools.lru_cache(maxsize=4)
def _world(seed: int) -> World:
    """The world of ``seed``, built once (it is only read)."""
    return World(seed)


def qa_set(n: int = 12, *, seed: int = 0, docs: int = 6, two_fact_every: int = 3) -> list[Question]:
    """``n`` questions (every ``two_fact_every``-th a two-fact one), each over ``docs``
    documents: the ones it needs among distractors, shuffled."""
    world = _world(seed)
    rng = random.Random(seed + 1)
    out: list[Question] = []
    companies = rng.sample(range(len(world.companies)), n)
    for k, ci in enumerate(companies):
        c = world.companies[ci]
        two = two_fact_every > 0 and k % two_fact_every == two_fact_every - 1
        if two:
            question, answer = (
                f"Who is the mayor of the town where {c.name} has its headquarters?",
                world.towns[c.town].mayor,
            )
            needed = [world.company_doc(ci), world.town_doc(c.town)]
        else:
            kind = k % 3
            if kind == 0:
                question, answer = f"Who founded {c.name}?", c.founder
            elif kind == 1:
                question, answer = f"What does {c.name} make?", c.product
            else:
                question, answer = f"In which year was {c.name} founded?", str(c.year)
            needed = [world.company_doc(ci)]
        texts = needed + distractors(world, rng, docs - len(needed), exclude_company=ci, exclude_town=c.town)
        order = list(range(len(texts)))
        rng.shuffle(order)
        shuffled = [texts[i] for i in order]
        out.append(
            Question(
                shuffled,
                question,
                answer,
                "two-fact" if two else "single",
                sorted(order.index(i) for i in range(len(needed))),
                c.name,
            )
        )
    return out


def distractors(world: World, rng: random.Random, count: int, *, exclude_company: int, exclude_town: int) -> list[str]:
    """``count`` documents about other companies and towns (half each)."""
    cs = [i for i in range(len(world.companies)) if i != exclude_company]
    ts = [i for i in range(len(world.towns)) if i != exclude_town]
    picked_c = rng.sample(cs, min(len(cs), (count + 1) // 2))
    picked_t = rng.sample(ts, min(len(ts), count - len(picked_c)))
    return [world.company_doc(i) for i in picked_c] + [world.town_doc(i) for i in picked_t]


def padded(q: Question, extra: int, *, seed: int = 0) -> Question:
    """``q`` with ``extra`` more distractor documents around its own (for longer contexts)."""
    world = _world(seed)
    rng = random.Random(seed + 7 + extra)
    names = " ".join(q.docs)
    pool = [world.company_doc(i) for i in range(len(world.companies))] + [
        world.town_doc(i) for i in range(len(world.towns))
    ]
    more = [d for d in pool if d.split(" ", 1)[0] not in names]
    rng.shuffle(more)
    docs = list(q.docs) + more[:extra]
    order = list(range(len(docs)))
    rng.shuffle(order)
    shuffled = [docs[i] for i in order]
    return Question(shuffled, q.question, q.answer, q.kind, sorted(order.index(i) for i in q.needed), q.subject)


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def correct(answer_text: str, gold: str) -> bool:
    """Exact match of the gold answer inside the model's (normalised) reply."""
    return f" {normalize(gold)} " in f" {normalize(answer_text)} "
