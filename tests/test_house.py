"""The house rules (docs/layout.md), read from the source as Python's own parser sees it: no import circles, no
module over 600 lines, stages that import only what the layering allows, private names that stay in their module,
imports at module level but for the optional, heavy dependencies, no two modules with one name, and the
vocabulary in one module."""

import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "train", "optimize", "export", "pipeline")
MAX_LINES = 600
FACES = ("api",)  # a stage's public functions (optimize.api, export.api): one name for one role in each package
# Imported inside functions, where they are used: what a plain runtime install does not have, or what takes seconds
# to import (TensorFlow and what is built on it), or what only one command needs.
OPTIONAL = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "tf2onnx", "onnx", "onnxruntime.quantization",
            "optuna", "sqlalchemy", "matplotlib", "scipy", "tqdm", "tflite_micro", "torch", "torchao", "litert_torch",
            "ai_edge_quantizer", "ai_edge_litert.tools", "flatbuffers", "h5py", "tensorboard", "sklearn")
# What each stage must never import (../shared/DESIGN.md, "Layers and who may import whom").
FORBIDDEN = {"runtime": ("train", "optimize", "export", "pipeline"), "train": ("optimize", "export", "pipeline"),
             "optimize": ("export", "pipeline"), "export": ("pipeline",)}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = (path, ast.parse(path.read_text(), str(path)))
    return found


MODULES = _modules()


def _optional(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in OPTIONAL)


def _imports(module: str, tree: ast.Module):
    """(the imported name, as a project module where it is one; the statement; whether it sits inside a function)."""
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node, id(node) in inner
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield (full if full in MODULES else node.module), node, id(node) in inner


def _project(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    edges = collections.defaultdict(set)
    for module, (_, tree) in MODULES.items():
        for name, _, _ in _imports(module, tree):
            target = _project(name)
            if target and target != module:
                edges[module].add(target)
    return edges


def _heavy() -> set[str]:
    """Project modules that import an optional dependency at module level, themselves or through another."""
    top = {module: {name for name, _, inside in _imports(module, tree) if not inside}
           for module, (_, tree) in MODULES.items()}
    heavy = {module for module, names in top.items() if any(_optional(n) for n in names)}
    while True:
        more = {module for module, names in top.items() if module not in heavy
                and any(_project(n) in heavy for n in names)}
        if not more:
            return heavy
        heavy |= more


def test_no_import_circles():
    edges, cycles = _graph(), []
    index, low, stack, on_stack, counter = {}, {}, [], set(), [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert cycles == []


def test_no_module_over_600_lines():
    long = {module: n for module, (path, _) in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_each_stage_imports_only_what_the_layering_allows(stage):
    wrong = sorted({f"{module} imports {target}" for module, targets in _graph().items() if module.split(".")[0] == stage
                    for target in targets if target.split(".")[0] in FORBIDDEN[stage]})
    assert wrong == []


def test_export_uses_optimize_through_its_public_api_only():
    used = {target for module, targets in _graph().items() if module.startswith("export")
            for target in targets if target.startswith("optimize")}
    assert used <= {"optimize", "optimize.api"}


def test_private_names_stay_inside_their_module():
    defined = collections.defaultdict(set)  # a private name -> the modules that define it
    for module, (_, tree) in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined[node.name].add(module)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined[node.attr].add(module)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined[node.id].add(module)
    crossing = []
    for module, (_, tree) in MODULES.items():
        for name, node, _ in _imports(module, tree):
            if isinstance(node, ast.ImportFrom) and _project(node.module):
                crossing += [f"{module} imports {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                    and defined.get(node.attr) and module not in defined[node.attr]):
                crossing.append(f"{module}:{node.lineno} reads .{node.attr} of {sorted(defined[node.attr])}")
    assert sorted(set(crossing)) == []


def test_imports_inside_functions_are_of_optional_dependencies_only():
    heavy, inside = _heavy(), []
    for module, (_, tree) in MODULES.items():
        for name, node, in_function in _imports(module, tree):
            if in_function and not _optional(name) and _project(name) not in heavy:
                inside.append(f"{module}:{node.lineno} imports {name}")
    assert inside == []


def test_the_runtime_is_light():
    """What a Raspberry Pi installs imports no optional dependency at module level."""
    assert sorted(m for m in _heavy() if m.startswith("runtime")) == []


def test_no_two_modules_share_a_name():
    names = collections.defaultdict(list)
    for module in MODULES:
        leaf = module.rpartition(".")[2]
        if leaf not in PACKAGES + FACES and module.count(".") and not MODULES[module][0].name.startswith("__"):
            names[leaf].append(module)
    assert {leaf: found for leaf, found in names.items() if len(found) > 1} == {}


def test_format_keys_and_techniques_are_listed_in_the_vocabulary_alone():
    """A tuple, list, set or dict of format keys written out elsewhere is a second copy of runtime/vocabulary.py's
    table; the choices a command offers (its menus, its defaults) are made of keys, never of the table's properties."""
    from runtime.vocabulary import FILE_FORMATS, QAT_FORMATS, TECHNIQUES

    copies = []
    for module, (_, tree) in MODULES.items():
        if module == "runtime.vocabulary":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict) and not all(isinstance(v, ast.Constant) for v in node.values):
                continue  # a dispatch table (a function per technique) names each key once, with its code
            elements = (node.keys if isinstance(node, ast.Dict) else node.elts
                        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [])
            values = {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            for name, listed in (("QAT_FORMATS", set(QAT_FORMATS)), ("TECHNIQUES", set(TECHNIQUES)),
                                 ("the float formats", {k for k, f in FILE_FORMATS.items() if f.kind == "float"}),
                                 ("the calibrated formats", {k for k, f in FILE_FORMATS.items() if f.calibrated}),
                                 ("the sparse formats", {k for k, f in FILE_FORMATS.items() if f.sparse})):
                if values and values == listed:
                    copies.append(f"{module}:{node.lineno} lists {name}")
    assert copies == []
