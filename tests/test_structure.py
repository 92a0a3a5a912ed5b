"""The architecture's rules, checked on the source: no import cycle, no kind switch outside heads/, simple functions.

These read src/manyheads with ``ast`` (and ruff for complexity); they run nothing of the package.
"""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import manyheads.heads as heads

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "manyheads"


def _kind_classes(cls: type) -> set[str]:
    """The names of every class below ``cls``: the registered kinds and their shared bases."""
    return set().union(*({sub.__name__} | _kind_classes(sub) for sub in cls.__subclasses__()))


KIND_CLASSES = _kind_classes(heads.Head)  # not Head itself: "is this a head at all" is no kind switch


def _module_name(path: Path) -> str:
    parts = ["manyheads", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (never run, so never a cycle)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {child.lineno for stmt in node.body for child in ast.walk(stmt) if hasattr(child, "lineno")}
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at module level or inside functions)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, tree in modules.items():
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from manyheads import encoding` imports the submodule; `from manyheads.x import f` imports x
                targets = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets = targets or [node.module]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["manyheads.heads.base"].add("manyheads.net")  # net imports heads: this closes a loop
    assert find_cycle(graph) is not None


def _is_kind(node: ast.AST) -> bool:
    """``x.kind`` (a head's kind name), not numpy's ``arr.dtype.kind``."""
    return isinstance(node, ast.Attribute) and node.attr == "kind" and getattr(node.value, "attr", None) != "dtype"


def _kind_switches(tree: ast.Module) -> list[str]:
    """Comparisons of ``.kind`` with names, lookups keyed by ``.kind`` and isinstance on kind classes."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = [n for s in sides for n in ast.walk(s) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
            if names and any(_is_kind(s) for s in sides):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Subscript) and _is_kind(node.slice):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            named = {getattr(n, "id", getattr(n, "attr", None)) for n in ast.walk(node.args[1])}
            if named & KIND_CLASSES:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_outside_heads_switches_on_a_head_kind():
    switches = {
        name: found
        for name, tree in _modules().items()
        if not name.startswith("manyheads.heads") and (found := _kind_switches(tree))
    }
    assert not switches, switches


def test_the_kind_switch_finder_sees_each_form():
    planted = ast.parse(
        "if head.kind == 'regression': pass\nx = PRIMARY[head.kind]\nok = isinstance(head, mh.Ordinal)\n"
        "if loss.head.kind in ('binary', 'multilabel'): pass\n"
        "if arr.dtype.kind != 'f' or error.kind is None: pass\n"  # not head kinds
    )
    assert len(_kind_switches(planted)) == 4


@pytest.mark.skipif(shutil.which("ruff") is None and not Path(sys.executable).with_name("ruff").exists(),
                    reason="ruff is not installed")  # fmt: skip
def test_every_function_has_a_cyclomatic_complexity_of_at_most_15():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    command = [ruff, "check", "--select", "C901", str(PACKAGE)]  # max-complexity 15 in pyproject.toml
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
