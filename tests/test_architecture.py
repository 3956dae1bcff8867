"""The house rules a newcomer relies on, checked on the source: layers, no import cycles, rooms of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "tuning", "storage")
# What each layer may import (bot → tuning → storage); telegram only in bot/.
ALLOWED = {"storage": {"storage"}, "tuning": {"tuning", "storage"}, "bot": {"bot", "tuning", "storage"}}
MAX_MODULE_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for name, path in _modules().items():
        layer = name.split(".")[0]
        for imported in _imports(path, top_level_only=False):
            top = imported.split(".")[0]
            if top in PACKAGES and top not in ALLOWED[layer]:
                wrong.append(f"{name} imports {imported}")
            if top == "telegram" and layer != "bot":
                wrong.append(f"{name} imports {imported} (Telegram belongs in bot/)")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_back():
    # An import inside a function that closes a loop is still one (grounding → evaluate → answering → grounding).
    modules = _modules()
    graph = {name: {m for m in _imports(path, top_level_only=False) if m in modules and m != name}
             for name, path in modules.items()}
    # A package's __init__ importing its own submodules is the usual re-export, not a cycle to untangle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (modules[name].name == "__init__.py" and m.startswith(name + "."))}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" → ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_modules_stay_a_readable_size():
    big = [f"{name}: {n} lines" for name, path in _modules().items()
           if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not big, f"split these (over {MAX_MODULE_LINES} lines):\n" + "\n".join(big)


def test_the_checks_above_can_fail(tmp_path):
    cyclic = tmp_path / "a.py"
    cyclic.write_text("import telegram\nfrom bot.cli import main\n\ndef f():\n    from storage import Store\n")
    assert _imports(cyclic, top_level_only=True) == {"telegram", "bot.cli", "bot.cli.main"}
    assert "storage.Store" in _imports(cyclic, top_level_only=False)
