"""The package's shape, read from its own source: no import cycle between fastkd's modules (function-
level imports count too: a cycle hidden in a function is still a cycle), no import against the flow
of the design card, and no private name taken from another module."""

import ast
from pathlib import Path

import fastkd

ROOT = Path(fastkd.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    # kernels/ (fastkd.kernels) is reached through a link rglob does not follow; it has no __init__.py.
    for path in (ROOT / "kernels").glob("*.py"):
        out[f"fastkd.kernels.{path.stem}"] = path
    return out


def _imports(modules: dict[str, Path]):
    """(importer, imported module, names taken) for every import statement, resolved to fastkd modules."""
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in modules:
                        yield name, submodule, []
                    elif target in modules:
                        yield name, target, [alias.name]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        yield name, alias.name, []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_fastkd_modules():
    modules = _modules()
    assert {"fastkd.distill.setup", "fastkd.distill.zero", "fastkd.losses", "fastkd.cli"} <= set(modules)
    graph = {m: set() for m in modules}
    for importer, imported, _ in _imports(modules):
        if imported != importer:
            graph[importer].add(imported)
    assert "fastkd.distill.setup" in graph["fastkd.distill.zero"]  # the reader sees real edges
    assert _cycles(graph) == []


# The design card's flow, corpus -> teacher -> losses -> students -> training -> distill/search/glue -> CLI,
# as layers: a module imports from its own layer and the ones before it, never from one after it.
FLOW = (
    ("foundations", ("fastkd", "fastkd.errors", "fastkd.io", "fastkd.file_identity", "fastkd.rundir", "fastkd.rng",
                     "fastkd.machine", "fastkd.device", "fastkd.processes", "fastkd.padding", "fastkd.tokenizer_identity",
                     "fastkd.optim", "fastkd.options", "fastkd.config_files", "fastkd.mapping")),
    ("corpus", ("fastkd.corpus",)),
    ("teacher and students", ("fastkd.zoo", "fastkd.capture", "fastkd.families", "fastkd.models", "fastkd.sentence",
                              "fastkd.teacher", "fastkd.memory", "fastkd.export")),
    ("losses", ("fastkd.kernels", "fastkd.ops", "fastkd.losses")),
    ("training", ("fastkd.training",)),
    ("commands", ("fastkd.config", "fastkd.distill", "fastkd.glue", "fastkd.search", "fastkd.bench", "fastkd.demo")),
    ("cli", ("fastkd.cli", "fastkd.__main__")),
)
# Within the commands: the search scores mappings by GLUE fine-tuning, the demo runs them all, and
# `fastkd.config` holds the settings of distill, demo and bench. glue depends on no other command.
COMMAND_USES = {"search": {"glue"}, "demo": {"config", "distill", "glue", "search"}, "distill": {"config"},
                "bench": {"config"}, "glue": set(), "config": set()}


def _layer(module: str) -> int:
    for rank, (_, names) in enumerate(FLOW):
        if any(module == name or (name != "fastkd" and module.startswith(name + ".")) for name in names):
            return rank
    raise AssertionError(f"{module} has no place in FLOW: add it to its layer")


def _flow_violations(modules: dict[str, Path]) -> list[str]:
    found = []
    for importer, imported, _ in _imports(modules):
        a, b = _layer(importer), _layer(imported)
        if b > a:
            found.append(f"{importer} ({FLOW[a][0]}) imports {imported} ({FLOW[b][0]})")
        elif a == b == 5:
            mine, theirs = importer.split(".")[1], imported.split(".")[1]
            if mine != theirs and theirs not in COMMAND_USES[mine]:
                found.append(f"{importer} imports another command's {imported}")
    return found


def test_no_import_against_the_flow():
    modules = _modules()
    assert {"fastkd.kernels.tiles", "fastkd.ops.attention_mse", "fastkd.cli"} <= set(modules)
    assert _flow_violations(modules) == []


def test_the_flow_check_sees_an_import_against_the_flow(tmp_path):
    corpus = tmp_path / "corpus.py"
    corpus.write_text("from .config import DistillConfig\n")
    glue = tmp_path / "run.py"
    glue.write_text("from ..distill import run_distill\n")
    modules = {"fastkd.corpus": corpus, "fastkd.config": tmp_path / "config.py", "fastkd.glue.run": glue,
               "fastkd.distill": tmp_path / "distill.py"}
    (tmp_path / "config.py").write_text("")
    (tmp_path / "distill.py").write_text("")
    assert _flow_violations(modules) == ["fastkd.corpus (corpus) imports fastkd.config (commands)",
                                         "fastkd.glue.run imports another command's fastkd.distill"]


def _private_attributes(modules: dict[str, Path]):
    """(module, 'alias._name') where a module reads a private name off another fastkd module it imported."""
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                aliases |= {a.asname or a.name for a in node.names if f"{target}.{a.name}" in modules}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname for a in node.names if a.name in modules and a.asname}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                yield name, f"{node.value.id}.{node.attr}"


def test_no_private_name_is_taken_from_another_module():
    modules = _modules()
    taken = [(importer, f"{imported}.{name}") for importer, imported, names in _imports(modules)
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert taken == []
    assert list(_private_attributes(modules)) == []  # nor read off the module


def test_the_reader_sees_a_private_attribute(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def _hidden():\n    pass\n")
    (tmp_path / "pkg" / "b.py").write_text("from . import a\n\n\ndef f():\n    return a._hidden()\n")
    modules = {"pkg": tmp_path / "pkg" / "__init__.py", "pkg.a": tmp_path / "pkg" / "a.py",
               "pkg.b": tmp_path / "pkg" / "b.py"}
    assert list(_private_attributes(modules)) == [("pkg.b", "a._hidden")]


def test_every_package_is_installed():
    """pyproject.toml lists its packages one by one: a new subpackage missing there works in the editable
    install the tests use and is absent from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {m for m, path in _modules().items() if path.name == "__init__.py"}
    assert packages <= listed, sorted(packages - listed)
