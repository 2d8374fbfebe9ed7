"""The package's shape: no import cycle among xft_jax modules (imports inside functions
count), no sys.path edits in xft_jax/ or configs/, every file at most 600 lines."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "xft_jax")


def _modules():
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(path, name, modules):
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(p, m, modules) for m, p in modules.items()}
    # a package's __init__ importing its own submodules is not a dependency of them
    graph = {m: {d for d in deps if not (modules[m].endswith("__init__.py")
                                         and d.startswith(m + "."))}
             for m, deps in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_sys_path_edits_and_files_stay_small():
    for top in ("xft_jax", "configs"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                text = open(os.path.join(d, f), encoding="utf-8").read()
                tree = ast.parse(text)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Attribute) and node.attr == "path" and \
                            isinstance(node.value, ast.Name) and node.value.id == "sys":
                        raise AssertionError(f"{top}/{f}: uses sys.path")
                assert text.count("\n") <= 600, f"{os.path.join(d, f)}: over 600 lines"
