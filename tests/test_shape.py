"""The shape of the code, kept by a test rather than by memory (shared/STYLE.md, issue 20):
imports among src/diskpages' modules and calls among csrc/'s files run one way (no circle,
however long, lazy imports and imports for type checking included), and no source file in
src/, csrc/ or benchmarks/ passes 700 lines."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "diskpages"
CSRC = ROOT / "csrc"
MAX_LINES = 700
SOURCE_SUFFIXES = {".py", ".pyi", ".c", ".h"}
NOT_SOURCE = {"build", ".build", "__pycache__", "results"}  # build output, benchmark results

pytestmark = pytest.mark.skipif(not PACKAGE.is_dir(), reason="needs the source tree")


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One circle through each strongly connected component of more than one node (or a
    node with an edge to itself), as a path that ends where it starts: Tarjan's algorithm,
    then a walk inside the component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    found = []
    for component in components:
        members = set(component)
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        path, seen, node = [start], {start}, start
        while True:  # every member of a component reaches every other: walk until a repeat
            node = min(n for n in graph[node] if n in members)
            if node in seen:
                found.append(path[path.index(node) :] + [node])
                break
            path.append(node)
            seen.add(node)
    return found


# -- Python -------------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def imported(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports: every import statement in the
    file, at any depth (inside functions and ``if TYPE_CHECKING:`` too), relative or
    absolute, and ``importlib.import_module("...")`` with a literal name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str, names: Iterable[str] | None = None) -> None:
        if names is None:  # import target
            if target in modules:
                found.add(target)
            return
        for n in names:  # from target import n: a submodule, or a name of target itself
            if f"{target}.{n}" in modules:
                found.add(f"{target}.{n}")
            elif target in modules:
                found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            add(target, [alias.name for alias in node.names])
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
                if isinstance(first.value, str):
                    add(first.value)
    found.discard(name)
    return found


def python_graph() -> dict[str, set[str]]:
    modules = python_modules()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    modules = {m: tmp_path / f"{m}.py" for m in ("pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg")}
    source = tmp_path / "a.py"
    source.write_text(
        "from __future__ import annotations\n"
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "from . import b as bee\n"
        "if TYPE_CHECKING:\n"
        "    from .c import Thing\n"
        "def f():\n"
        "    import pkg.d\n"
        "    from . import Public\n"
        "    return importlib.import_module('pkg.e')\n"
    )
    assert imported("pkg.a", source, modules) == {"pkg", "pkg.b", "pkg.c", "pkg.d", "pkg.e"}


def test_the_cycle_finder_finds_long_circles_and_only_circles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"a"}}) == [["a", "a"]]


def test_python_imports_run_one_way():
    graph = python_graph()
    assert "diskpages._cache" in graph and "diskpages._bindings" in graph["diskpages._cache"]
    found = cycles(graph)
    edges = {m: sorted(graph[m]) for c in found for m in sorted(set(c))}
    assert not found, (
        "modules of src/diskpages import each other: "
        + "; ".join(" -> ".join(c) for c in found)
        + f" (what each of them imports: {edges})"
    )


def test_adapters_use_only_the_public_api():
    """zict.py and dask.py import the package's public names (``from . import PageCache``),
    or another adapter or the errors module, never a private module; and nothing imports
    them."""
    graph = python_graph()
    adapters = {"diskpages.zict", "diskpages.dask"}
    public = {"diskpages", "diskpages.errors"} | adapters
    for adapter in adapters:
        assert graph[adapter] <= public, f"{adapter} imports {sorted(graph[adapter] - public)}"
    for name, targets in graph.items():
        if name not in adapters:
            assert not targets & adapters, f"{name} imports an adapter: {sorted(targets & adapters)}"


def test_each_python_module_names_one_concern():
    """The first line of each module's docstring names its concern, without an "and"."""
    for path in python_modules().values():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{path.relative_to(ROOT)} has no docstring"
        first = doc.splitlines()[0]
        assert not re.search(r"\band\b", first), f"{path.relative_to(ROOT)}: {first!r}"


# -- C ------------------------------------------------------------------------------------

_COMMENT_OR_LITERAL = re.compile(r"/\*.*?\*/|//[^\n]*|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", re.S)
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def _code(text: str) -> str:
    """The C text with comments, strings and preprocessor lines blanked (newlines kept)."""
    text = _COMMENT_OR_LITERAL.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)
    return re.sub(r"(?m)^[ \t]*#.*(?:\\\n.*)*$", "", text)


def c_functions(text: str) -> tuple[set[str], set[str]]:
    """(the functions the file defines that other files may call: not static), and (every
    identifier its code names: calls, and functions passed as callbacks)."""
    code = _code(text)
    exported = set()
    depth, header_start = 0, 0
    for i, ch in enumerate(code):
        if ch == "{":
            if depth == 0:
                header = code[header_start:i]
                # a definition: "... name(parameters) {" at depth 0, not "x[] = {"
                m = re.search(r"([A-Za-z_]\w*)\s*\((?:[^()]|\([^()]*\))*\)\s*$", header)
                if m and "=" not in header and not re.search(r"\bstatic\b", header):
                    exported.add(m.group(1))
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                header_start = i + 1
        elif ch == ";" and depth == 0:
            header_start = i + 1
    return exported, set(_IDENTIFIER.findall(code))


def c_graph() -> dict[str, set[str]]:
    """File -> the other csrc/*.c files whose non-static functions it calls (or names,
    to pass as a callback)."""
    parsed = {p.name: c_functions(p.read_text()) for p in sorted(CSRC.glob("*.c"))}
    owner: dict[str, str] = {}
    for name, (exported, _) in parsed.items():
        for function in exported:
            assert function not in owner, f"{function} is defined in {owner[function]} and {name}"
            owner[function] = name
    return {
        name: {owner[f] for f in used if f in owner and owner[f] != name}
        for name, (_, used) in parsed.items()
    }


def test_the_c_reader_finds_definitions_and_calls():
    text = (
        "/* int commented(void) { } */\n"
        "#define X(a) { a }\n"
        "static int helper(int x) { return x; }\n"
        "int dp_public(dp_cache *c, void (*cb)(void *))\n{\n    if (c) { helper(1); }\n"
        '    return dp_other("dp_in_a_string()", dp_callback);\n}\n'
        "static const int table[] = {1, 2};\n"
        "struct s { int (*f)(void); };\n"
    )
    exported, used = c_functions(text)
    assert exported == {"dp_public"}
    assert {"dp_other", "dp_callback", "helper"} <= used
    assert not {"dp_in_a_string", "commented"} & used


def test_c_calls_run_one_way():
    graph = c_graph()
    assert graph, "no C files found"
    found = cycles(graph)
    edges = {f: sorted(graph[f]) for c in found for f in sorted(set(c))}
    assert not found, (
        "files of csrc/ call each other: "
        + "; ".join(" -> ".join(c) for c in found)
        + f" (what each of them calls: {edges})"
    )


# -- sizes --------------------------------------------------------------------------------


def source_files() -> list[Path]:
    files = []
    for folder in ("src", "csrc", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*")):
            rel = path.relative_to(ROOT)
            if not path.is_file() or path.suffix not in SOURCE_SUFFIXES:
                continue
            if NOT_SOURCE & set(rel.parts) or any(p.endswith(".egg-info") for p in rel.parts):
                continue
            if path.name.startswith("_native."):  # cffi's generated C, never committed
                continue
            files.append(path)
    return files


def test_no_source_file_passes_700_lines():
    files = source_files()
    assert any(p.name == "_cache.py" for p in files) and any(p.suffix == ".c" for p in files)
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them along a seam): {long}"
