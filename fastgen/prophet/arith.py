"""The synthetic task of the built-in ``arith-dlm`` model: short additions and comparisons with checkable answers.

``scripts/train_arith_dlm.py`` trains on the ``"train"`` split; tests and ``fastgen eval prophet`` use the held-out
``"test"`` split (10% of all problems, chosen by a fixed hash, never trained on).
"""
from __future__ import annotations

import random
import zlib

ARITH_ANSWER_PREFIX = "The answer is "
ARITH_WORDS = ("What", "Which", "is", "larger", "or", "The", "answer")


def _random_number(rng: random.Random, max_digits: int) -> int:
    """A number whose digit count is uniform in 1..max_digits (so short and long operands are equally common)."""
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def arith_is_heldout(kind: str, a: int, b: int) -> bool:
    """Deterministic 10% split: held-out problems are never seen in training."""
    return zlib.crc32(f"{kind}:{a}:{b}".encode()) % 10 == 0


def arith_problem(rng: random.Random) -> dict:
    """One problem of the built-in task: addition of 1-2 digit numbers (60%) or comparison of 1-3 digit ones (40%)."""
    if rng.random() < 0.6:
        a, b = _random_number(rng, 2), _random_number(rng, 2)
        kind, prompt, answer = "add", f"What is {a}+{b}? ", str(a + b)
    else:
        a, b = _random_number(rng, 3), _random_number(rng, 3)
        while b == a:
            b = _random_number(rng, 3)
        kind, prompt, answer = "compare", f"Which is larger, {a} or {b}? ", str(max(a, b))
    return {
        "kind": kind,
        "a": a,
        "b": b,
        "prompt": prompt,
        "answer": answer,
        "completion": f"{ARITH_ANSWER_PREFIX}{answer}.",
    }


def arith_problems(n: int, *, split: str = "test", seed: int = 0) -> list[dict]:
    """``n`` distinct problems from the ``"train"`` or held-out ``"test"`` split, reproducible from ``seed``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        p = arith_problem(rng)
        key = (p["kind"], p["a"], p["b"])
        if arith_is_heldout(*key) != (split == "test") or (split == "test" and key in seen):
            continue
        seen.add(key)
        out.append(p)
    return out


def arith_extract_answer(text: str) -> str | None:
    """The number after the last "The answer is" in ``text``, or None."""
    idx = text.rfind(ARITH_ANSWER_PREFIX)
    if idx < 0:
        return None
    rest = text[idx + len(ARITH_ANSWER_PREFIX):]
    digits = ""
    for ch in rest:
        if not ch.isdigit():
            break
        digits += ch
    return digits or None
