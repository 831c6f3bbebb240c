"""Write a deterministic synthetic sentiment dataset (product, film, food, hotel, book reviews).

    python scripts/make_demo_text.py                      # data/demo_text/reviews.csv
    python scripts/make_demo_text.py out.jsonl --rows 500 # .csv, .jsonl or .parquet

Reviews come from varied templates: plain praise or complaint, negated opinions
("was not bad"), contrasts whose last clause decides ("the staff was rude, but
overall the hotel was lovely"), recommendations, filler sentences and typos. A small
share of labels is flipped on purpose (label noise), so no model reaches 100 %.
The same arguments always write the same file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DOMAINS = {
    "film": (["movie", "film", "documentary", "sequel", "thriller", "comedy"],
             ["acting", "script", "soundtrack", "pacing", "ending", "camera work"]),
    "food": (["restaurant", "meal", "dinner", "cafe", "pizza", "burger place"],
             ["service", "dessert", "waiter", "menu", "portion", "coffee"]),
    "product": (["phone", "laptop", "blender", "vacuum", "headset", "kettle"],
                ["battery", "screen", "handle", "charger", "packaging", "manual"]),
    "hotel": (["hotel", "room", "resort", "hostel", "apartment", "inn"],
              ["staff", "breakfast", "bed", "shower", "view", "location"]),
    "book": (["book", "novel", "memoir", "cookbook", "biography", "textbook"],
             ["plot", "cover", "last chapter", "main character", "prose", "index"]),
}  # fmt: skip
POSITIVE = ["good", "great", "excellent", "wonderful", "fantastic", "lovely", "superb",
            "delightful", "impressive", "solid", "brilliant", "pleasant", "amazing"]  # fmt: skip
NEGATIVE = ["bad", "terrible", "awful", "disappointing", "poor", "dreadful", "boring",
            "mediocre", "horrible", "useless", "annoying", "weak", "unpleasant"]  # fmt: skip
LIKE = ["loved", "enjoyed", "liked", "adored", "appreciated"]
DISLIKE = ["hated", "disliked", "regretted", "despised", "could not stand"]
LIKE_BASE = ["love", "enjoy", "like", "appreciate"]
DISLIKE_BASE = ["hate", "dislike", "regret", "despise"]
INTENSIFIERS = ["", "", "", "really ", "very ", "truly ", "quite ", "extremely "]
FILLER = ["I went there last week.", "We ordered it on a Monday.", "My sister picked it.",
          "It arrived on time.", "This was my second try.", "I read about it online.",
          "We were a group of four.", "It cost about what I expected."]  # fmt: skip
COPULAS = ["was", "is", "seemed", "felt"]


def _opinion(rng: random.Random, positive: bool) -> str:
    return rng.choice(POSITIVE if positive else NEGATIVE)


def review(rng: random.Random, positive: bool) -> str:
    """One review whose sentiment is ``positive`` (True) or negative."""
    subjects, aspects = DOMAINS[rng.choice(sorted(DOMAINS))]
    subject, aspect = rng.choice(subjects), rng.choice(aspects)
    very, cop = rng.choice(INTENSIFIERS), rng.choice(COPULAS)
    kind = rng.random()
    if kind < 0.30:
        text = f"The {subject} {cop} {very}{_opinion(rng, positive)}."
    elif kind < 0.45:
        verb = rng.choice(LIKE if positive else DISLIKE)
        text = f"I {verb} this {subject}."
    elif kind < 0.62:
        # negated opposite: "was not bad" is positive, "was not good" negative
        cop = rng.choice(["was", "is"])
        neg = rng.choice(["not", "not", "never", "hardly"])
        text = f"The {subject} {cop} {neg} {_opinion(rng, not positive)}."
    elif kind < 0.72:
        # "didn't like" is negative, "did not hate" positive
        verb = rng.choice(LIKE_BASE if not positive else DISLIKE_BASE)
        aux = rng.choice(["did not", "didn't"])
        text = f"I {aux} {verb} the {subject}."
    elif kind < 0.84:
        # contrast: the clause after "but" decides
        text = (f"The {aspect} was {_opinion(rng, not positive)}, but overall the {subject} "
                f"was {very}{_opinion(rng, positive)}.")  # fmt: skip
    elif kind < 0.93:
        if positive:
            text = rng.choice([f"I would recommend this {subject} to anyone.",
                               f"Would happily buy this {subject} again.",
                               f"Five stars for the {subject}, the {aspect} was {_opinion(rng, True)}."])  # fmt: skip
        else:
            text = rng.choice([f"I would not recommend this {subject} to anyone.",
                               f"Would never buy this {subject} again.",
                               f"One star for the {subject}, the {aspect} was {_opinion(rng, False)}."])  # fmt: skip
    else:
        text = (f"Both the {aspect} and the {subject} were {very}"
                f"{_opinion(rng, positive)}.")  # fmt: skip
    if rng.random() < 0.35:
        text = (
            f"{rng.choice(FILLER)} {text}" if rng.random() < 0.5 else f"{text} {rng.choice(FILLER)}"
        )
    if rng.random() < 0.08:
        text = _typo(rng, text)
    return text


def _typo(rng: random.Random, text: str) -> str:
    """Swap two neighbouring letters of one longer word."""
    words = text.split(" ")
    long_words = [i for i, w in enumerate(words) if len(w) > 4 and w.isalpha()]
    if not long_words:
        return text
    i = rng.choice(long_words)
    j = rng.randrange(len(words[i]) - 1)
    w = words[i]
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def make_reviews(rows: int = 6000, seed: int = 0, label_noise: float = 0.02) -> list[dict]:
    """``rows`` reviews as ``{"id", "text", "label"}`` dicts, labels "negative"/"positive"."""
    rng = random.Random(seed)
    records = []
    for i in range(rows):
        positive = rng.random() < 0.5
        text = review(rng, positive)
        if rng.random() < label_noise:
            positive = not positive
        records.append({"id": f"r{i:05d}", "text": text,
                        "label": "positive" if positive else "negative"})  # fmt: skip
    return records


def write_table(records: list[dict], path: Path) -> Path:
    """Write records as CSV, JSONL or Parquet, chosen by the file suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record) + "\n")
    elif suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.DataFrame.from_records(records)
        if suffix == ".csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
    else:
        raise SystemExit(f"unsupported suffix {suffix!r}: use .csv, .jsonl or .parquet")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="data/demo_text/reviews.csv", type=Path)
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-noise", type=float, default=0.02)
    args = parser.parse_args()
    path = write_table(make_reviews(args.rows, args.seed, args.label_noise), args.out)
    print(f"wrote {args.rows} reviews to {path}")


if __name__ == "__main__":
    main()
