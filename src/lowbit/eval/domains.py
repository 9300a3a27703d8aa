"""Evaluation text by domain, from what every installation carries: prose (the Python reference
manual's evaluation part), code (Python standard-library sources), arithmetic and step-by-step
math (a seeded generator), chat (conversations in the model's own chat template).

Each set is deterministic for a seed and a Python installation, and disjoint from the default
calibration text: any line of it that also occurs in the calibration part is dropped."""

from __future__ import annotations

import ast
import inspect
import random
import sysconfig
from pathlib import Path

from lowbit.data import default_text
from lowbit.errors import DataError

DOMAINS = ("prose", "code", "arithmetic", "math", "chat")

# pure-Python standard-library modules: sources for code, docstrings for chat (disjoint lists)
CODE_MODULES = ("textwrap", "heapq", "bisect", "fractions", "statistics", "colorsys", "calendar", "difflib",
                "shlex", "graphlib", "dataclasses", "functools", "csv", "ipaddress", "argparse", "string",
                "queue", "enum", "fnmatch", "tokenize")
CHAT_MODULES = ("shutil", "pathlib", "glob", "zipfile", "tarfile", "gzip", "base64", "uuid", "copy", "pprint",
                "random", "datetime", "email/utils", "locale", "contextlib", "operator", "typing", "urllib/parse")

# one prompt per domain for generation side by side
PROMPTS = {
    "prose": "The garbage collector in Python works by",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "arithmetic": "37 + 48 = 85\n126 - 59 = 67\n23 × 7 =",
    "math": "Question: A baker makes 12 trays of 9 rolls and sells 47 rolls. How many rolls are left?\nStep 1:",
    "chat": "How do I read a file line by line in Python?",
}


def _stdlib_source(module: str) -> str:
    path = Path(sysconfig.get_paths()["stdlib"]) / f"{module}.py"
    if not path.is_file():
        raise DataError(f"the standard-library source {path} is missing from this Python; the code and chat "
                        "domains need Python's own .py files (install the full python3 package)")
    return path.read_text(encoding="utf-8")


def code_text() -> str:
    return "\n\n".join(_stdlib_source(m) for m in CODE_MODULES)


def arithmetic_text(seed: int, lines: int = 6000) -> str:
    rng = random.Random(f"arithmetic:{seed}")
    out = []
    for _ in range(lines):
        op = rng.choice("+-×÷")
        if op == "+":
            a, b = rng.randint(0, 9999), rng.randint(0, 9999)
            out.append(f"{a} + {b} = {a + b}")
        elif op == "-":
            a, b = sorted((rng.randint(0, 9999), rng.randint(0, 9999)), reverse=True)
            out.append(f"{a} - {b} = {a - b}")
        elif op == "×":
            a, b = rng.randint(2, 999), rng.randint(2, 99)
            out.append(f"{a} × {b} = {a * b}")
        else:
            b, q = rng.randint(2, 99), rng.randint(2, 999)
            out.append(f"{b * q} ÷ {b} = {q}")
    return "\n".join(out)


_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena")
_ITEMS = (("boxes", "pencils"), ("crates", "apples"), ("shelves", "books"), ("bags", "marbles"), ("trays", "cookies"))


def _problem(rng: random.Random) -> str:
    name, (holder, thing) = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        n, k = rng.randint(3, 40), rng.randint(2, 24)
        total = n * k
        given = rng.randint(1, total - 1)
        return (f"Question: {name} has {n} {holder} of {k} {thing} each and gives away {given} {thing}. "
                f"How many {thing} are left?\nStep 1: {n} × {k} = {total} {thing} in all.\n"
                f"Step 2: {total} - {given} = {total - given}.\nAnswer: {total - given}")
    if kind == 1:
        price, count = rng.randint(2, 60), rng.randint(2, 15)
        cost = price * count
        paid = cost + rng.randint(1, 200)
        return (f"Question: {count} {thing} cost {price} dollars each. {name} pays with {paid} dollars. "
                f"How much change does {name} get?\nStep 1: {count} × {price} = {cost} dollars.\n"
                f"Step 2: {paid} - {cost} = {paid - cost}.\nAnswer: {paid - cost} dollars")
    if kind == 2:
        per, groups = rng.randint(2, 30), rng.randint(2, 30)
        total = per * groups
        return (f"Question: {name} shares {total} {thing} equally among {groups} friends. How many does each "
                f"friend get?\nStep 1: {total} ÷ {groups} = {per}.\nAnswer: {per} {thing}")
    speed, hours, extra = rng.randint(20, 120), rng.randint(2, 9), rng.randint(5, 90)
    d = speed * hours
    return (f"Question: A train travels at {speed} km per hour for {hours} hours, then {extra} km more. "
            f"How far does it travel?\nStep 1: {speed} × {hours} = {d} km.\nStep 2: {d} + {extra} = {d + extra} km.\n"
            f"Answer: {d + extra} km")


def math_text(seed: int, problems: int = 1500) -> str:
    rng = random.Random(f"math:{seed}")
    return "\n\n".join(_problem(rng) for _ in range(problems))


def _docstring_pairs(module: str) -> list[tuple[str, str]]:
    """(question, answer) from each documented public function and class of a module's source."""
    tree = ast.parse(_stdlib_source(module))
    pairs = []
    dotted = module.replace("/", ".")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                what = "class" if isinstance(node, ast.ClassDef) else "function"
                pairs.append((f"What does the {what} `{node.name}` in Python's `{dotted}` module do?",
                              inspect.cleandoc(doc)))
    return pairs


def chat_text(tokenizer, seed: int) -> str | None:
    """Conversations in the tokenizer's chat template; None when the model has none."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    pairs = [p for m in CHAT_MODULES for p in _docstring_pairs(m)]
    random.Random(f"chat:{seed}").shuffle(pairs)
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                           tokenize=False) for q, a in pairs]
    return "".join(chats)


def _disjoint(text: str, calibration_lines: set[str]) -> str:
    """text without the lines that also occur in the calibration text (blank lines kept)."""
    return "\n".join(line for line in text.split("\n")
                     if not line.strip() or line.strip() not in calibration_lines)


def calibration_lines() -> set[str]:
    return {line.strip() for line in default_text("calib").split("\n") if line.strip()}


def domain_texts(tokenizer, seed: int = 0) -> dict[str, str]:
    """The built-in domains (chat only when the tokenizer has a chat template)."""
    texts = {"prose": default_text("eval"), "code": code_text(), "arithmetic": arithmetic_text(seed),
             "math": math_text(seed)}
    chat = chat_text(tokenizer, seed)
    if chat is not None:
        texts["chat"] = chat
    calib = calibration_lines()
    return {name: _disjoint(t, calib) for name, t in texts.items()}


def chat_prompt(tokenizer, question: str) -> str:
    """A user turn in the model's template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def domain_prompts(tokenizer, names) -> dict[str, str]:
    """The generation prompt of each named built-in domain (user domains get the start of their text)."""
    out = {}
    for name in names:
        if name == "chat":
            out[name] = chat_prompt(tokenizer, PROMPTS["chat"])
        elif name in PROMPTS:
            out[name] = PROMPTS[name]
    return out


def read_named_texts(pairs: list[str] | None) -> dict[str, str]:
    """`--data NAME=FILE` (repeatable) as {name: text}."""
    from lowbit.data import read_text

    out = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise DataError(f"--data {pair!r}: with --domains, name each extra text set as NAME=FILE (e.g. legal=contracts.txt)")
        if name in out or name in DOMAINS:
            raise DataError(f"--data {pair!r}: the domain {name!r} is already defined; choose another NAME")
        out[name], _ = read_text(path, "eval")
    return out


def evaluate_domains(candidate_model, reference_model, tokenizer, ctx: int, windows: int, seed: int = 0,
                     extra: dict[str, str] | None = None, max_new_tokens: int = 32, progress: bool = True) -> dict:
    """KLD / top-1 / PPL per domain, sensitivity (each domain's KLD over prose's) and, per built-in
    domain, the reference's and the candidate's greedy continuation of its prompt."""
    from lowbit.data import token_windows
    from lowbit.eval.divergence import compare_streaming
    from lowbit.eval.report import generate_text

    texts = {**domain_texts(tokenizer, seed), **(extra or {})}
    scores = {}
    for name, text in texts.items():
        w = token_windows(tokenizer, text, ctx, windows, what=f"the {name} domain's")
        r = compare_streaming(candidate_model, reference_model, w, None, None, progress)
        scores[name] = {k: v for k, v in r.as_dict().items() if not k.startswith("kv_")}
    prose = scores["prose"]["kld"]
    for s in scores.values():
        s["sensitivity"] = s["kld"] / prose if prose > 0 else None
    generations = {}
    for name, prompt in domain_prompts(tokenizer, texts).items():
        generations[name] = {"prompt": prompt,
                             "reference": generate_text(reference_model, tokenizer, prompt, max_new_tokens),
                             "candidate": generate_text(candidate_model, tokenizer, prompt, max_new_tokens)}
    return {"domains": scores, "generations": generations, "domain_seed": seed,
            "domain_windows": {"ctx": ctx, "windows": windows}}
