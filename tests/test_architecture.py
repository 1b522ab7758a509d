"""The layers hold: rewards/ and rollouts/ never import rlfh; families/ (the model boundary) imports
none of rlfh, rollouts and rewards; the learner imports rollouts/ only where colocated mode samples
and never imports the recipes; no import cycles; nothing reaches into another module's private names;
no function in rlfh/ over 60 lines without a written reason beside it.

Imports are read from the source (ast), including those inside functions: a lazy import that
closes a cycle is still a cycle for a reader.
"""

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rlfh", "rewards", "rollouts", "families")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@functools.lru_cache(maxsize=None)  # parsed once per session: the trees are only read
def sources(*roots: str) -> dict[str, ast.Module]:
    out = {}
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            out[module_name(path)] = ast.parse(path.read_text(), str(path))
    return out


def resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` (a module or module.attribute) names."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    return {m: set(ts) for m, ts in _import_graph().items()}  # a copy: callers may edit theirs


@functools.lru_cache(maxsize=None)
def _import_graph() -> dict[str, set[str]]:
    mods = sources(*PACKAGES)
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, tree in mods.items():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for n in names:
                target = resolve(n, known)
                if target and target != mod and not mod.startswith(target + "."):  # a package's own __init__
                    graph[mod].add(target)
    return graph


def test_rewards_and_rollouts_never_import_rlfh():
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in import_graph().items()
        if m.split(".")[0] in ("rewards", "rollouts")
        for t in ts
        if t.split(".")[0] == "rlfh"
    )
    assert not bad, bad


def test_rewards_and_rollouts_are_independent():
    graph = import_graph()
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        for t in ts
        if {m.split(".")[0], t.split(".")[0]} == {"rewards", "rollouts"}
    )
    assert not bad, bad


def test_families_import_none_of_rlfh_rollouts_rewards():
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in import_graph().items()
        if m.split(".")[0] == "families"
        for t in ts
        if t.split(".")[0] in ("rlfh", "rollouts", "rewards")
    )
    assert not bad, bad


def test_learner_imports_rollouts_only_to_sample_colocated():
    graph = import_graph()
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.startswith("rlfh.learner") and m != "rlfh.learner.colocate"
        for t in ts
        if t.split(".")[0] == "rollouts"
    )
    assert not bad, bad
    assert any(t.startswith("rollouts") for t in graph["rlfh.learner.colocate"])  # the rule checks a real edge


def test_learner_never_imports_recipes():
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in import_graph().items()
        if m.startswith("rlfh.learner")
        for t in ts
        if t.startswith("rlfh.recipes")
    )
    assert not bad, bad


def test_no_import_cycles():
    graph = import_graph()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def private_names() -> set[str]:
    """Private functions, classes and attributes defined in the packages."""
    names = set()
    for tree in sources(*PACKAGES).values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("self", "cls")
            ):  # our own objects' attributes, not a library's
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


@pytest.mark.parametrize("root", ["rlfh", "rewards", "rollouts", "families", "bench", "tests"])
def test_no_cross_module_private_names(root):
    ours = private_names()
    bad = []
    for mod, tree in sources(root).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                bad += [
                    f"{mod}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr in ours
                and isinstance(node.value, ast.Name)
                and node.value.id not in ("self", "cls")
            ):
                bad.append(f"{mod}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, bad


def _is_loss_value(node: ast.AST) -> bool:
    """``x.loss``, a variable ``loss``, or a spec's ``name``: a value of ``learner.loss``."""
    if isinstance(node, ast.Attribute):
        return node.attr == "loss" or (
            node.attr == "name" and isinstance(node.value, ast.Name) and node.value.id.endswith("spec")
        )
    return isinstance(node, ast.Name) and node.id == "loss"


def _is_string_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)
    return False


def loss_name_literals(tree: ast.Module) -> list[int]:
    """Lines where a loss name is compared with a string literal: ``==``/``!=``/``in`` against strings
    (or a tuple of them), or ``.startswith``/``.endswith``/``.removeprefix`` with a string."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_loss_value(o) for o in operands) and any(_is_string_literal(o) for o in operands):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "endswith", "removeprefix", "removesuffix")
            and _is_loss_value(node.func.value)
            and any(_is_string_literal(a) for a in node.args)
        ):
            lines.append(node.lineno)
    return lines


def test_loss_families_are_decided_by_the_registry_only():
    """A loss family is one file plus one line in rlfh/losses/registry.py: nothing else in rlfh/
    branches on the spelling of ``learner.loss`` (``loss.startswith("dpo")`` would also match a new
    ``dpo``-prefixed family that trains on something else)."""
    bad = [
        f"{mod}:{line}"
        for mod, tree in sources("rlfh").items()
        if mod != "rlfh.losses.registry"
        for line in loss_name_literals(tree)
    ]
    assert not bad, bad


def test_the_loss_name_scan_finds_what_it_forbids():
    code = (
        'a = lc.loss == "dpo"\nb = loss in ("nft", "awm")\nc = cfg.learner.loss.startswith("dpo")\n'
        'd = spec.name != "ddpo"\ne = lc.loss == other\nf = lc.lr == "x"\n'
    )
    assert loss_name_literals(ast.parse(code)) == [1, 2, 3, 4]


def folder_of(mod: str) -> str:
    """``rlfh.run.metrics`` -> ``rlfh.run``; a top-level module (``rlfh.env``) is its own folder."""
    parts = mod.split(".")
    return ".".join(parts[:2])


def test_no_folder_cycles():
    """No two folders of rlfh/ import each other, even through different modules (run/ <-> eval/ once
    did: the guards imported eval/, and eval/ the checkpoints of run/)."""
    edges: dict[str, set[str]] = {}
    for m, ts in import_graph().items():
        for t in ts:
            a, b = folder_of(m), folder_of(t)
            if a != b and a.startswith("rlfh.") and b.startswith("rlfh."):
                edges.setdefault(a, set()).add(b)

    def reaches(src: str, dst: str) -> bool:
        seen, todo = set(), [src]
        while todo:
            v = todo.pop()
            if v == dst:
                return True
            if v not in seen:
                seen.add(v)
                todo.extend(edges.get(v, ()))
        return False

    loops = sorted({tuple(sorted((a, b))) for a, bs in edges.items() for b in bs if reaches(b, a)})
    assert not loops, loops


def test_run_and_eval_do_not_import_each_other_both_ways():
    graph = import_graph()
    run_to_eval = sorted(
        f"{m} -> {t}" for m, ts in graph.items() if m.startswith("rlfh.run") for t in ts if t.startswith("rlfh.eval")
    )
    eval_to_run = sorted(
        f"{m} -> {t}" for m, ts in graph.items() if m.startswith("rlfh.eval") for t in ts if t.startswith("rlfh.run")
    )
    assert not (run_to_eval and eval_to_run), (run_to_eval, eval_to_run)


def test_loops_reach_the_data_sources_only_through_their_registry():
    """A new per-round data source is one file under rlfh/data/sources/ and one registry line: the
    recipes import the registry (rlfh.data.sources), never a source of their own choosing."""
    bad = sorted(
        f"{m} -> {t}"
        for m, ts in import_graph().items()
        if m.startswith("rlfh.recipes")
        for t in ts
        if t.startswith("rlfh.data.sources.")
    )
    assert not bad, bad


MAX_LEARNER_FILE_LINES = 400


def test_no_learner_file_is_a_catch_all():
    """rlfh/learner/ is split by concern (policy weights, optimization, checkpoint I/O, one file per step loop): a
    file over 400 lines is where the next feature's branches would pile up again."""
    long = {
        p.name: n
        for p in sorted((REPO / "rlfh" / "learner").glob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LEARNER_FILE_LINES
    }
    assert not long, f"over {MAX_LEARNER_FILE_LINES} lines: {long}"


MAX_FUNCTION_LINES = 60
LONG_MARKER = "# long:"


def function_length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the function's last line, less its docstring (decorators not counted)."""
    n = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        n -= first.end_lineno - first.lineno + 1
    return n


def has_long_reason(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    """The line right above the ``def`` (or its first decorator) is ``# long: <reason>``."""
    top = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    above = lines[top - 2].strip() if top >= 2 else ""
    return above.startswith(LONG_MARKER) and bool(above[len(LONG_MARKER) :].strip())


def long_functions(source: str, module: str = "<source>") -> list[str]:
    """``module:line name (N lines)`` for each function (methods and nested ones included) over
    MAX_FUNCTION_LINES without a ``# long:`` reason above it."""
    tree, lines, out = ast.parse(source), source.splitlines(), []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                n = function_length(child)
                if n > MAX_FUNCTION_LINES and not has_long_reason(child, lines):
                    out.append(f"{module}:{child.lineno} {name} ({n} lines)")
                name += "."
            elif isinstance(child, ast.ClassDef):
                name = f"{prefix}{child.name}."
            visit(child, name)

    visit(tree, "")
    return out


def test_functions_are_at_most_60_lines_or_say_why():
    """A function in rlfh/ over 60 lines (its docstring not counted) is split into helpers that read
    top to bottom, or carries ``# long: <reason>`` on the line above its ``def``."""
    bad = [
        hit
        for path in sorted((REPO / "rlfh").rglob("*.py"))
        for hit in long_functions(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert not bad, bad


def test_the_function_length_scan_finds_what_it_forbids():
    def body(n: int, indent: str = "    ") -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    limit = MAX_FUNCTION_LINES - 1  # body lines that, with the def line, make the limit
    code = (
        f'def at_limit():\n    """A docstring,\n    not counted."""\n{body(limit)}\n'
        f"def over():\n{body(limit + 1)}\n"
        f"# long: one table that reads best whole\n@decorated\ndef excused():\n{body(limit + 1)}\n"
        f"# long:\ndef empty_reason():\n{body(limit + 1)}\n"
        f"class C:\n    def method(self):\n{body(limit + 1, '        ')}\n"
        f"def outer():\n    def inner():\n{body(limit + 1, '        ')}\n"
    )
    lines = code.splitlines()
    hits = long_functions(code, "m.py")
    assert [h.split(" ", 1)[1] for h in hits] == [
        "over (61 lines)",
        "empty_reason (61 lines)",
        "C.method (61 lines)",
        "outer (62 lines)",  # a nested function's lines count in the function holding it too
        "outer.inner (61 lines)",
    ]
    assert hits[0].split(" ")[0] == f"m.py:{lines.index('def over():') + 1}"
