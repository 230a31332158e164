"""The code layout of issue #15: no module over 400 lines, no class over 250 lines, and every
module opens with a docstring whose first line names what it owns (``streams/``, ``mockllm/``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("streams", "mockllm")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250  # end_lineno - lineno + 1: decorators not counted, the docstring is

def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _sizes() -> dict[str, int]:
    """Lines of every module ("path") and every class in it ("path::Class", nested too)."""
    sizes: dict[str, int] = {}
    for path in _modules():
        name = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        sizes[name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text, filename=name)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                sizes[f"{name}::{node.name}"] = node.end_lineno - node.lineno + 1
    return sizes


def _over(sizes: dict[str, int], max_module: int, max_class: int) -> dict[str, int]:
    return {name: n for name, n in sizes.items()
            if n > (max_class if "::" in name else max_module)}


def test_the_walk_sees_both_packages() -> None:
    sizes = _sizes()
    assert "streams/config.py" in sizes and "mockllm/server.py" in sizes
    assert "streams/intake/runtime.py::Runtime" in sizes
    assert len([n for n in sizes if "::" not in n]) > 50


def test_no_module_or_class_over_its_limit() -> None:
    over = _over(_sizes(), MAX_MODULE_LINES, MAX_CLASS_LINES)
    assert not over, (f"over {MAX_MODULE_LINES} lines a module / {MAX_CLASS_LINES} a class: "
                      f"{over}; split it along a real responsibility (issue #15)")


def test_every_module_has_a_docstring_naming_what_it_owns() -> None:
    missing = []
    for path in _modules():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        if not doc or not doc.splitlines()[0].strip():
            missing.append(path.relative_to(ROOT).as_posix())
    assert not missing, f"modules without a docstring whose first line says what they own: {missing}"
