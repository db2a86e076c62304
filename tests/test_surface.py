"""The public surface: library errors never name a CLI flag (the CLI adds it), and the public API is documented and
typed; the targets have one implementation under three module paths."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import click
import pytest

import onnxcam
from onnxcam import cache, cli
from onnxcam.autodiff.builder import Builder
from onnxcam.cam.api import Explanation
from onnxcam.errors import InputError
from onnxcam.explainer import Analysis, Compiled, Explainer, Result
from onnxcam.graph.load import LoadedModel
from onnxcam.rewrite import Rewritten

PACKAGE = Path(onnxcam.__file__).parent


def cli_flags() -> set[str]:
    flags = set()
    for command in [cli.main, *cli.main.commands.values()]:
        for param in command.params:
            if isinstance(param, click.Option):
                flags |= {opt for opt in param.opts + param.secondary_opts if opt.startswith("--")}
    return flags - {"--help"}


def raised_texts(root: Path) -> list[tuple[str, int, str]]:
    """(file, line, text) of every string in a raise statement of the library (cli.py excluded)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for sub in ast.walk(node.exc):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        found.append((str(path.relative_to(root)), sub.lineno, sub.value))
    return found


def flag_mentions(root: Path, flags: set[str]) -> list[str]:
    return [f"{file}:{line}: {text!r}" for file, line, text in raised_texts(root)
            if any(flag in text.split() or f"{flag} " in text or text.endswith(flag) for flag in flags)]


def test_library_errors_never_name_a_cli_flag():
    flags = cli_flags()
    assert {"--size", "--layout", "--bgr"} <= flags
    assert not flag_mentions(PACKAGE, flags)


def test_the_cli_adds_the_flag_of_the_option_that_fixes_an_error():
    error = InputError("input 'x' has a dynamic spatial size (?, 3, ?, ?): give the size (H, W)", option="size")
    assert cli._message(error) == ("input 'x' has a dynamic spatial size (?, 3, ?, ?): give the size (H, W) "
                                   "(option --size HxW)")
    assert cli._message(InputError("no option")) == "no option"


@pytest.mark.parametrize("cls", [Explainer, Result, Compiled, Analysis, Rewritten, Builder, Explanation, LoadedModel,
                                 cache.Cache])
def test_public_classes_are_documented(cls):
    assert (cls.__doc__ or "").strip(), f"{cls.__name__} has no docstring"


@pytest.mark.parametrize("cls", [Explainer, LoadedModel, cache.Cache, Result])
def test_public_methods_are_documented_and_typed(cls):
    missing = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        func = member.fget if isinstance(member, property) else member
        if not callable(func):
            continue
        if not (func.__doc__ or "").strip() and name not in ("get", "put", "watch"):
            missing.append(f"{name}: no docstring")
        sig = inspect.signature(func)
        untyped = [p for p in list(sig.parameters)[1:] if sig.parameters[p].annotation is inspect.Parameter.empty]
        if untyped and name != "__init__":
            missing.append(f"{name}: untyped {untyped}")
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{name}: no return type")
    assert not missing, missing


def test_the_targets_have_one_implementation_under_three_paths():
    from onnxcam import targets
    from onnxcam.cam import targets as home
    from onnxcam.utils import model_targets

    for module in (targets, model_targets):
        for name in module.__all__:
            assert getattr(module, name) is getattr(home, name), f"{module.__name__}.{name} is a second copy"
    assert set(model_targets.__all__) <= set(home.__all__)
    own = [n for n, v in vars(model_targets).items() if inspect.isclass(v) or inspect.isfunction(v)]
    assert all(getattr(model_targets, n).__module__ == "onnxcam.cam.targets" for n in own)
