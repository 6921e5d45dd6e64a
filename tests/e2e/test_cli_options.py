"""Every verb keeps its options: names, flags, defaults, help text, and what ``--help`` shows.

``cli_options.json`` is the command line as it was when each verb moved into its own module;
an option that disappears, is renamed, or changes its default or help fails here. Regenerate it
only for a deliberate change to the command line::

    .venv/bin/python tests/e2e/test_cli_options.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).with_name("cli_options.json")


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if type(annotation) is type else str(annotation)


def describe_cli() -> dict[str, Any]:
    """The ``kiln`` command line as plain data: each verb's help, arguments and options."""
    import typer

    from kiln.cli.main import app

    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    verbs: dict[str, Any] = {}
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        verbs[name] = {
            "help": cmd.help,
            "hidden": cmd.hidden,
            "extra_args": bool(cmd.context_settings.get("allow_extra_args")),
            "unknown_options": bool(cmd.context_settings.get("ignore_unknown_options")),
            "params": _params(cmd),
        }
    return {"help": group.help, "params": _params(group), "verbs": verbs}


def _params(cmd: Any) -> list[dict[str, Any]]:
    """What ``--help`` and the parser know of each argument and option of ``cmd``."""
    return [
        {
            "name": p.name,
            "kind": type(p).__name__,
            "opts": [*p.opts, *p.secondary_opts],
            "type": _type_name(p.type_descriptor.annotation),  # type: ignore[attr-defined]
            "default": None if callable(p.default) else p.default,
            "required": p.required,
            "nargs": p.nargs,
            "multiple": p.multiple,
            "is_flag": getattr(p, "is_flag", False),
            "hidden": getattr(p, "hidden", False),
            "eager": p.is_eager,
            "show_default": getattr(p, "show_default", None),
            "help": getattr(p, "help", None),
        }
        for p in cmd.params
    ]


def test_every_verb_keeps_its_options() -> None:
    golden = json.loads(GOLDEN.read_text())
    now = describe_cli()
    assert list(now["verbs"]) == list(golden["verbs"]), "verbs added, removed or reordered"
    assert now["help"] == golden["help"] and now["params"] == golden["params"]
    for verb, want in golden["verbs"].items():
        got = now["verbs"][verb]
        want_params = {p["name"]: p for p in want["params"]}
        got_params = {p["name"]: p for p in got["params"]}
        assert list(got_params) == list(want_params), f"kiln {verb}: options differ"
        for name, param in want_params.items():
            assert got_params[name] == param, f"kiln {verb} {name}"
        assert got == want, f"kiln {verb}"


@pytest.mark.parametrize("verb", list(json.loads(GOLDEN.read_text())["verbs"]))
def test_help_lists_every_option_with_its_default(verb: str) -> None:
    from typer.testing import CliRunner

    from kiln.cli.main import app

    # Wide enough that no option name or default is wrapped or cut.
    result = CliRunner().invoke(app, [verb, "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for param in json.loads(GOLDEN.read_text())["verbs"][verb]["params"]:
        if param["hidden"]:
            continue
        for opt in param["opts"]:
            assert opt in text, f"kiln {verb} --help lacks {opt}"
        default = param["default"]
        if param["kind"] == "TyperOption" and default not in (None, False):
            assert f"[default: {default}]" in text, f"kiln {verb} --help: default of {param}"


if __name__ == "__main__":
    os.environ.setdefault("COLUMNS", "400")
    GOLDEN.write_text(json.dumps(describe_cli(), indent=1) + "\n")
