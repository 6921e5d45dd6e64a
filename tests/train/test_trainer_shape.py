"""The Trainer stays a thin loop over explicit parts (DESIGN.md rule 2), not a grab bag.

Its class body stays within ~300 lines and 15 instance attributes, and no function of
``kiln.train`` outside the Trainer takes the Trainer (callbacks receive it: that is their API).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import kiln.train
from kiln.train.trainer import Trainer


def _assigned_attributes(cls: type) -> set[str]:
    tree = ast.parse(inspect.getsource(cls))
    names = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            for leaf in ast.walk(t):
                if (
                    isinstance(leaf, ast.Attribute)
                    and isinstance(leaf.value, ast.Name)
                    and leaf.value.id == "self"
                ):
                    names.add(leaf.attr)
    return names


def test_trainer_is_at_most_300_lines_and_15_attributes() -> None:
    lines, _ = inspect.getsourcelines(Trainer)
    assert len(lines) <= 300
    attrs = _assigned_attributes(Trainer)
    assert len(attrs) <= 15, sorted(attrs)


def test_no_function_outside_the_trainer_takes_the_trainer() -> None:
    offenders = []
    for path in Path(kiln.train.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("on_"):  # a callback's method: it receives the trainer
                continue
            for arg in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]:
                hint = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if "Trainer" in hint or (arg.arg == "trainer" and path.name != "trainer.py"):
                    offenders.append(f"{path.name}:{node.lineno} {node.name}({arg.arg})")
    assert offenders == []
