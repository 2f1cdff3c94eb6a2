"""The package's structure, read from the source text alone (ast and tokenize; nothing of sparsescale is imported):
imports run one way (no cycle), no private name crosses a module, the README's layout list names every module in
an order every import follows, and every import inside a function says why it is deferred.

Each checker takes the source root, so that the `*_catches_*` tests can show it failing on a small planted tree.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PKG = "sparsescale"
LIST_INTRO = "(a module imports only the ones listed after it):"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module (dotted)
    target: str  # the imported sparsescale module (dotted), or the one a name is taken from
    names: tuple[str, ...]  # names taken by `from target import ...` (empty for `import target`)
    line: int


def modules(src: Path = SRC) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package) for every .py file under src/sparsescale."""
    out = {}
    for path in sorted((src / PKG).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _resolve(name: str, mods: dict) -> str | None:
    """The module a dotted name lives in: its longest prefix that is a module."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _source(node: ast.ImportFrom, module: str, mods: dict) -> str:
    """The dotted module a `from ... import` reads from, relative imports resolved against `module`."""
    if not node.level:
        return node.module or ""
    package = module if mods[module][1] else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return package + ("." + node.module if node.module else "")


def _function_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside a function body (at any depth)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def imports(src: Path = SRC) -> list[Import]:
    """Every import of a sparsescale module, at module level or inside a function, absolute or relative.
    `from pkg import sub` where `sub` is a module is an import of `pkg.sub` (not of `pkg`); a dotted-name string
    constant naming a module (the CLI dispatch tables run `importlib.import_module` on them) is an import too."""
    mods = modules(src)
    out = []
    for name, (path, _) in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _resolve(alias.name, mods)
                    if target:
                        out.append(Import(name, target, (), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                source = _source(node, name, mods)
                if source.split(".")[0] != PKG:
                    continue
                plain = []
                for alias in node.names:
                    if f"{source}.{alias.name}" in mods:  # a submodule
                        out.append(Import(name, f"{source}.{alias.name}", (), node.lineno))
                    else:
                        plain.append(alias.name)
                if plain and _resolve(source, mods):
                    out.append(Import(name, _resolve(source, mods), tuple(plain), node.lineno))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in mods:
                out.append(Import(name, node.value, (), node.lineno))
    return [i for i in out if i.target != i.module]


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules(src)}
    for imp in imports(src):
        graph[imp.module].add(imp.target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def private_crossings(src: Path = SRC) -> list[str]:
    """`from x import _y` and `x._y` where x is another sparsescale module: 'file:line: what'."""
    mods = modules(src)
    found = [f"{mods[i.module][0].relative_to(src)}:{i.line}: from {i.target} import {n}"
             for i in imports(src) for n in i.names if n.startswith("_") and not n.startswith("__")]
    for name, (path, _) in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}  # local name -> the sparsescale module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    # `import sparsescale.x as X` binds X to sparsescale.x; `import sparsescale.x` binds sparsescale
                    if a.name.split(".")[0] == PKG:
                        aliases[a.asname or PKG] = a.name if a.asname else PKG
            elif isinstance(node, ast.ImportFrom):
                aliases.update(_module_names(node, name, mods))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and aliases.get(value.id):
                owner = ".".join([aliases[value.id], *reversed(chain)])
                if owner in mods and owner != name:
                    found.append(f"{path.relative_to(src)}:{node.lineno}: {owner}.{node.attr}")
    return found


def _module_names(node: ast.ImportFrom, module: str, mods: dict) -> dict[str, str]:
    """local name -> module, for the names of a `from ... import` that are sparsescale modules."""
    source = _source(node, module, mods)
    return {a.asname or a.name: f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in mods}


def readme_layout(readme: str) -> list[str]:
    """The README's layout list, in order: the names of its `x.py` and `x/` entries (descriptions dropped)."""
    start = readme.index(LIST_INTRO) + len(LIST_INTRO)
    block = readme[start:].split("\n\n")[0]
    while re.search(r"\([^()]*\)", block):
        block = re.sub(r"\([^()]*\)", "", block)  # descriptions, which may name other things in backticks
    return re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)(?:\.py|/)`", block)


def top_level(module: str) -> str | None:
    """The README entry a module belongs to: `sparsescale.superweight.cli` -> `superweight`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else None


def layout_problems(src: Path = SRC, readme: str | None = None) -> list[str]:
    readme = (ROOT / "README.md").read_text() if readme is None else readme
    listed = readme_layout(readme)
    tree = {p.stem for p in (src / PKG).glob("*.py") if p.stem not in ("__init__", "__main__")}
    tree |= {p.parent.name for p in (src / PKG).glob("*/__init__.py")}
    problems = [f"{n} is in the tree but not in the README layout list" for n in sorted(tree - set(listed))]
    problems += [f"{n} is in the README layout list but not in the tree" for n in sorted(set(listed) - tree)]
    problems += [f"{n} is listed twice" for n in sorted({n for n in listed if listed.count(n) > 1})]
    rank = {n: i for i, n in enumerate(listed)}
    for imp in imports(src):
        a, b = top_level(imp.module), top_level(imp.target)
        if a in rank and b in rank and a != b and rank[b] < rank[a]:
            problems.append(f"{imp.module} (line {imp.line}) imports {imp.target}, listed before it")
    return sorted(set(problems))


def _comment_lines(text: str) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return {tok.start[0] for tok in tokens if tok.type == tokenize.COMMENT}


def undocumented_deferrals(src: Path = SRC) -> list[str]:
    """Imports inside a function with no comment on their lines nor in the comment right above them (a run of
    imports shares one comment: the lines of the imports above are skipped on the way up)."""
    found = []
    for path in sorted((src / PKG).rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text, str(path))
        inside = _function_nodes(tree)
        nested = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) in inside),
                        key=lambda n: n.lineno)
        import_lines = {ln for n in nested for ln in range(n.lineno, n.end_lineno + 1)}
        comments = _comment_lines(text)
        lines = text.splitlines()
        for node in nested:
            ok = any(ln in comments for ln in range(node.lineno, node.end_lineno + 1))
            ln = node.lineno - 1
            while not ok and ln >= 1:
                if ln in comments:
                    ok = True
                elif ln in import_lines:
                    ln -= 1
                    continue
                break
            if not ok:
                found.append(f"{path.relative_to(src)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


# ------------------------------------------------------------------------------------------------------------
# the package


def test_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_crosses_modules():
    found = private_crossings()
    assert not found, "underscore names used from another module:\n" + "\n".join(found)


def test_readme_layout_lists_every_module_in_import_order():
    assert len(readme_layout((ROOT / "README.md").read_text())) > 10  # the list was found
    problems = layout_problems()
    assert not problems, "README layout list:\n" + "\n".join(problems)


def test_every_import_inside_a_function_says_why():
    found = undocumented_deferrals()
    assert not found, "imports inside functions without a comment on why they are deferred:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------------------------
# the checkers, on a small planted tree


@pytest.fixture
def planted(tmp_path) -> Path:
    files = {
        "__init__.py": '"""pkg."""\n__version__ = "0"\n',
        "cli.py": 'from sparsescale import __version__\nCOMMANDS = {"a": "sparsescale.a"}\n',
        "a.py": "from sparsescale import b\nfrom .sub import leaf\n\n\ndef f():\n    # deferred: heavy\n"
                "    import json\n    import os\n    return b.g()\n",
        "b.py": "import sparsescale.sub.leaf as L\n\n\ndef g():\n    return L.h()\n",
        "sub/__init__.py": "",
        "sub/leaf.py": "def h():\n    return 1\n\n\ndef _p():\n    return 2\n",
    }
    for name, text in files.items():
        (tmp_path / PKG / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PKG / name).write_text(text)
    return tmp_path


README = f"Layout {LIST_INTRO}\n`cli.py` (the `x.py` CLI) · `a.py`, `b.py` · `sub/` (leaf)\n\nnext section\n"


def test_the_planted_tree_is_clean(planted):
    graph = import_graph(planted)
    assert graph["sparsescale.cli"] == {PKG, "sparsescale.a"}  # the dispatch string is an edge
    assert graph["sparsescale.a"] == {"sparsescale.b", "sparsescale.sub.leaf"}  # submodules, not packages
    assert find_cycle(graph) is None
    assert private_crossings(planted) == []
    assert readme_layout(README) == ["cli", "a", "b", "sub"]
    assert layout_problems(planted, README) == []
    assert undocumented_deferrals(planted) == []


def test_cycle_check_catches_an_in_function_import_back(planted):
    (planted / PKG / "sub" / "leaf.py").write_text("def h():\n    from sparsescale.a import f  # late\n    return f\n")
    assert find_cycle(import_graph(planted)) == ["sparsescale.a", "sparsescale.b", "sparsescale.sub.leaf",
                                                 "sparsescale.a"]


@pytest.mark.parametrize("line", ["from sparsescale.sub.leaf import _p", "from .sub.leaf import _p as p",
                                  "from sparsescale.sub import leaf\nx = leaf._p",
                                  "import sparsescale.sub.leaf\nx = sparsescale.sub.leaf._p"])
def test_private_check_catches_a_crossing(planted, line):
    (planted / PKG / "cli.py").write_text(line + "\n")
    assert len(private_crossings(planted)) == 1


def test_layout_check_catches_a_missing_module_and_an_import_against_the_order(planted):
    (planted / PKG / "new.py").write_text("")
    (planted / PKG / "b.py").write_text("from sparsescale import a\n")
    assert layout_problems(planted, README) == ["new is in the tree but not in the README layout list",
                                                "sparsescale.b (line 1) imports sparsescale.a, listed before it"]


def test_deferral_check_catches_an_import_without_a_comment(planted):
    text = (planted / PKG / "a.py").read_text()
    (planted / PKG / "a.py").write_text(text.replace("    # deferred: heavy\n", "    x = 1\n"))
    assert undocumented_deferrals(planted) == ["sparsescale/a.py:7: import json", "sparsescale/a.py:8: import os"]


def test_every_markdown_table_row_has_as_many_cells_as_its_header():
    """A row with a `|` too few merges two columns (GitHub renders it without a word of warning)."""
    docs = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("results/reference/**/*.md")]
    bad = []
    for path in docs:
        header = None
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.startswith("|"):
                header = None
                continue
            cells = len(re.split(r"(?<!\\)\|", line.strip().strip("|")))
            header = header or cells
            if cells != header:
                bad.append(f"{path.relative_to(ROOT)}:{number}: {cells} cells, its header {header}")
    assert len(docs) > 15 and not bad, "\n".join(bad)
