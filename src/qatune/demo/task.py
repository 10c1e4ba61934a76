"""The demo's Q&A task, written by the project itself: facts about countries from a small table.

Every fact (capital, continent) is asked in four phrasings. For each fact one phrasing is held
out: the held-out questions ask facts the model has seen, in words it has never seen them asked
in. Answering them needs the model to have learned the fact *and* to find the country in an
unfamiliar question: memorizing question strings scores 0. A randomly initialized GPT-2 scores 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# country: (capital, continent)
FACTS: dict[str, tuple[str, str]] = {
    "France": ("Paris", "Europe"),
    "Germany": ("Berlin", "Europe"),
    "Italy": ("Rome", "Europe"),
    "Spain": ("Madrid", "Europe"),
    "Portugal": ("Lisbon", "Europe"),
    "Norway": ("Oslo", "Europe"),
    "Sweden": ("Stockholm", "Europe"),
    "Finland": ("Helsinki", "Europe"),
    "Poland": ("Warsaw", "Europe"),
    "Greece": ("Athens", "Europe"),
    "Austria": ("Vienna", "Europe"),
    "Ireland": ("Dublin", "Europe"),
    "Hungary": ("Budapest", "Europe"),
    "Egypt": ("Cairo", "Africa"),
    "Kenya": ("Nairobi", "Africa"),
    "Nigeria": ("Abuja", "Africa"),
    "Ghana": ("Accra", "Africa"),
    "Morocco": ("Rabat", "Africa"),
    "Ethiopia": ("Addis Ababa", "Africa"),
    "Senegal": ("Dakar", "Africa"),
    "Japan": ("Tokyo", "Asia"),
    "China": ("Beijing", "Asia"),
    "India": ("New Delhi", "Asia"),
    "Thailand": ("Bangkok", "Asia"),
    "Vietnam": ("Hanoi", "Asia"),
    "Indonesia": ("Jakarta", "Asia"),
    "Iran": ("Tehran", "Asia"),
    "Nepal": ("Kathmandu", "Asia"),
    "Peru": ("Lima", "South America"),
    "Chile": ("Santiago", "South America"),
    "Argentina": ("Buenos Aires", "South America"),
    "Colombia": ("Bogota", "South America"),
    "Brazil": ("Brasilia", "South America"),
    "Canada": ("Ottawa", "North America"),
    "Mexico": ("Mexico City", "North America"),
    "Cuba": ("Havana", "North America"),
    "Australia": ("Canberra", "Oceania"),
    "Fiji": ("Suva", "Oceania"),
    "New Zealand": ("Wellington", "Oceania"),
    "Samoa": ("Apia", "Oceania"),
}

PHRASINGS: dict[str, list[str]] = {
    "capital": [
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "Name the capital city of {c}.",
        "{c} has its capital in which city?",
    ],
    "continent": [
        "On which continent is {c}?",
        "Which continent is {c} in?",
        "Name the continent where {c} lies.",
        "{c} is part of which continent?",
    ],
}


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


def all_questions() -> list[tuple[str, str, int, QA]]:
    """(country, attribute, phrasing index, question) for every fact and phrasing."""
    out = []
    for country, (capital, continent) in FACTS.items():
        for attribute, answer in (("capital", capital), ("continent", continent)):
            for k, phrasing in enumerate(PHRASINGS[attribute]):
                out.append((country, attribute, k, QA(phrasing.format(c=country), answer)))
    return out


def make_task(seed: int = 0) -> tuple[list[QA], list[QA]]:
    """(training questions, held-out questions): one random phrasing of every fact is held out."""
    rng = random.Random(seed)
    held = {(c, a): rng.randrange(len(PHRASINGS[a])) for c in FACTS for a in PHRASINGS}
    train, test = [], []
    for country, attribute, k, qa in all_questions():
        (test if held[country, attribute] == k else train).append(qa)
    return train, test
