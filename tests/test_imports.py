"""The package's imports point one way: no module imports one that imports it back (any depth)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# installed package name -> source folder (export/ and cli/ are mapped into keras_vit)
PACKAGES = {"keras_vit": "keras_vit", "keras_vit.export": "export", "keras_vit.cli": "cli"}


def _modules():
    """{module name: path} of every .py file of the package."""
    found = {}
    for package, folder in PACKAGES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and (package != "keras_vit" or d not in ("export", "cli"))]
            rel = os.path.relpath(dirpath, base)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for f in filenames:
                if f.endswith(".py"):
                    found[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(dirpath, f)
    return found


def _imports(name, path, modules):
    """Package modules that `name` imports anywhere in its file (top level or in functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_package = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = parts[: len(parts) - node.level + (1 if is_package else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            # `from keras_vit import data` names the module keras_vit.data; else the longest known prefix
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph):
    """One import cycle as a list of module names, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ re-exporting its submodules is not a cycle with them
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_sees_the_package():
    graph = _graph()
    assert {"keras_vit.vit", "keras_vit.model", "keras_vit.train.loop", "keras_vit.export.onnx",
            "keras_vit.cli.main"} <= set(graph)
    assert "keras_vit.model" in graph["keras_vit.vit"]
    assert "keras_vit.data" in graph["keras_vit.train.loop"]


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_lazy_names_stay_what_they_name_after_every_submodule_is_imported():
    """A lazy public name that is also a submodule's name is replaced by the module as soon as
    anything imports that submodule (`keras_vit.predict` imported keras_vit.train.evaluate, and
    `keras_vit.train.evaluate(...)` then raised "'module' object is not callable")."""
    import importlib
    import types

    import keras_vit
    import keras_vit.train
    import keras_vit.weights

    # the modules of keras_vit itself and of its train and weights packages (not export's or cli's)
    for name in _modules():
        if name.startswith(("keras_vit.train.", "keras_vit.weights.")) or (
                name.count(".") == 1 and name not in ("keras_vit.export", "keras_vit.cli")):
            importlib.import_module(name)
    io = importlib.import_module("keras_vit.weights.io")
    public = {keras_vit: keras_vit.__all__, keras_vit.train: keras_vit.train.__all__,
              # keras_vit.weights hands out keras_vit.weights.io's own functions and classes
              keras_vit.weights: [n for n, v in vars(io).items() if getattr(v, "__module__", None) == io.__name__]}
    for package, names in public.items():
        lazy = getattr(package, "_LAZY", {})
        for name in names:
            meant_as_module = (lazy.get(name) or "").endswith("." + name) or name in getattr(package, "SUBMODULES", ())
            if name.startswith("__") or meant_as_module:
                continue
            value = getattr(package, name)
            assert not isinstance(value, types.ModuleType), f"{package.__name__}.{name} is the module {value.__name__}"
