"""The size limits of the house style: no file of the package or the kernels over 450 lines, no
function over 60 (benchmarks' functions too).

Triton kernels (``@triton.jit``) are left out of the function limit: their signatures list every
pointer, stride and constexpr one per line, and splitting a kernel's body into jit helpers is a
change to time on a GPU, not a tidy-up."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _is_triton_kernel(node: ast.AST) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def test_no_package_file_is_over_the_line_limit():
    long = [
        f"{p.relative_to(ROOT)}: {n}"
        for p in _sources("arpo_fast", "kernels")
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_over_the_line_limit():
    long = []
    for path in _sources("arpo_fast", "kernels", "benchmarks"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines}")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
