"""Generates the bundled arithmetic word-problem set (rlengine/data_files/arithmetic_{train,test}.jsonl).

    python tools/make_arithmetic.py [--train 3000] [--test 500] [--seed 1234] [--out rlengine/data_files]

Seeded and deterministic: the same arguments write byte-identical files. Each row is
{"question": str, "answer": str (an integer), "steps": 1 | 2, "template": str}.
Difficulty is pitched at SmolLM2-135M-Instruct (solves some, not most): one- and two-step
problems (add, subtract, multiply, share equally) with small numbers, answers 0..200.
Train and test questions are disjoint.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

NAMES = ["Tom", "Sara", "Ben", "Mia", "Leo", "Ana", "Sam", "Lily", "Max", "Emma", "Noah", "Zoe",
         "Omar", "Ivy", "Jack", "Nina", "Raj", "Eva", "Paul", "Rosa"]
THINGS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells",
          "stamps", "balloons", "candies", "toy cars", "flowers", "coins", "buttons", "eggs"]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("pack", "packs"), ("jar", "jars"), ("basket", "baskets")]

Problem = tuple[str, int]


def _pick(rng: random.Random):
    return rng.choice(NAMES), rng.choice(THINGS)


def add(rng: random.Random) -> Problem:
    name, thing = _pick(rng)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    return f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have now?", a + b


def subtract(rng: random.Random) -> Problem:
    name, thing = _pick(rng)
    a = rng.randint(8, 40)
    b = rng.randint(1, a - 1)
    return (f"{name} had {a} {thing} and gave {b} of them to a friend. "
            f"How many {thing} does {name} have left?", a - b)


def multiply(rng: random.Random) -> Problem:
    name, thing = _pick(rng)
    one, many = rng.choice(CONTAINERS)
    per, count = rng.randint(2, 10), rng.randint(2, 9)
    return (f"Each {one} holds {per} {thing}. {name} has {count} {many}. "
            f"How many {thing} does {name} have in total?", per * count)


def share(rng: random.Random) -> Problem:
    name, thing = _pick(rng)
    kids, each = rng.randint(2, 8), rng.randint(2, 10)
    return (f"{name} shares {kids * each} {thing} equally among {kids} friends. "
            f"How many {thing} does each friend get?", each)


def compare(rng: random.Random) -> Problem:
    (n1, thing), n2 = _pick(rng), rng.choice(NAMES)
    while n2 == n1:
        n2 = rng.choice(NAMES)
    a, b = rng.randint(2, 30), rng.randint(2, 20)
    return f"{n1} has {a} {thing}. {n2} has {b} more {thing} than {n1}. How many {thing} does {n2} have?", a + b


def add_then_subtract(rng: random.Random) -> Problem:
    name, thing = _pick(rng)
    a, b = rng.randint(3, 25), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {thing}, buys {b} more and then loses {c}. "
            f"How many {thing} does {name} have now?", a + b - c)


def multiply_then_add(rng: random.Random) -> Problem:
    name, thing = _pick(rng)
    one, many = rng.choice(CONTAINERS)
    per, count, extra = rng.randint(2, 10), rng.randint(2, 6), rng.randint(1, 15)
    return (f"{name} buys {count} {many} of {thing} with {per} {thing} in each {one}, "
            f"and already had {extra} {thing}. How many {thing} does {name} have now?", per * count + extra)


def two_people_total(rng: random.Random) -> Problem:
    (n1, thing), n2 = _pick(rng), rng.choice(NAMES)
    while n2 == n1:
        n2 = rng.choice(NAMES)
    a, b = rng.randint(2, 25), rng.randint(2, 15)
    return (f"{n1} has {a} {thing}. {n2} has {b} more {thing} than {n1}. "
            f"How many {thing} do they have together?", a + (a + b))


def price(rng: random.Random) -> Problem:
    name, thing = _pick(rng)
    cost, count = rng.randint(2, 9), rng.randint(2, 8)
    paid = cost * count + rng.randint(0, 20)
    return (f"One of the {thing} costs {cost} dollars. {name} buys {count} of them and pays with "
            f"{paid} dollars. How many dollars of change does {name} get?", paid - cost * count)


ONE_STEP: list[Callable[[random.Random], Problem]] = [add, subtract, multiply, share, compare]
TWO_STEP: list[Callable[[random.Random], Problem]] = [add_then_subtract, multiply_then_add, two_people_total, price]


def generate(total: int, rng: random.Random, seen: set[str], two_step_share: float = 0.4) -> list[dict]:
    rows = []
    while len(rows) < total:
        two = rng.random() < two_step_share
        template = rng.choice(TWO_STEP if two else ONE_STEP)
        question, answer = template(rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": str(answer), "steps": 2 if two else 1,
                     "template": template.__name__})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "rlengine" / "data_files"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    seen: set[str] = set()
    test = generate(args.test, rng, seen)      # test first, so growing --train keeps the test set
    train = generate(args.train, rng, seen)
    out = Path(args.out)
    write_jsonl(train, out / "arithmetic_train.jsonl")
    write_jsonl(test, out / "arithmetic_test.jsonl")
    print(json.dumps({"train": len(train), "test": len(test), "seed": args.seed, "out": str(out)}))


if __name__ == "__main__":
    main()
