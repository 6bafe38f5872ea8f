"""Write benchmarks/data/sharegpt_sample.json: a small synthetic file in ShareGPT's format.

Not real ShareGPT data: conversations are made from a fixed word list with a seeded RNG,
so the file is reproducible (tests/bench checks that it is up to date). A few entries are
malformed on purpose (one turn, no "conversations") to exercise the loader's filters.
Run: python scripts/gen_sharegpt_sample.py [--check]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "sharegpt_sample.json"
SEED = 20261122
CONVERSATIONS = 64
WORDS = (
    "the a model request token cache prefix decode prefill worker router cluster latency "
    "throughput memory batch schedule stream queue answer question explain write describe "
    "summarize compare list why how what when small large fast slow first next every "
    "system user assistant story poem code function python data table result error value"
).split()
OPENERS = ("Explain", "Describe", "Write", "Summarize", "Compare", "List", "Why does", "How can")


def sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def paragraph(rng: random.Random, n_sentences: int) -> str:
    return " ".join(sentence(rng, rng.randint(5, 14)) for _ in range(n_sentences))


def build() -> list[dict]:
    rng = random.Random(SEED)
    data: list[dict] = []
    for i in range(CONVERSATIONS):
        question = f"{rng.choice(OPENERS)} {paragraph(rng, rng.randint(1, 6)).lower()}"
        turns = [
            {"from": "human", "value": question},
            {"from": "gpt", "value": paragraph(rng, rng.randint(2, 10))},
        ]
        if rng.random() < 0.3:
            turns += [
                {"from": "human", "value": sentence(rng, 8)},
                {"from": "gpt", "value": paragraph(rng, 2)},
            ]
        data.append({"id": f"synthetic-{i:03d}", "conversations": turns})
    data.append({"id": "one-turn", "conversations": [{"from": "human", "value": "Hi."}]})
    data.append({"id": "no-conversations"})
    return data


def render() -> str:
    return json.dumps(build(), indent=1) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is stale: run python scripts/gen_sharegpt_sample.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
