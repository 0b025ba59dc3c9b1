"""Imports point down: the layer rule of docs/architecture.md, checked on the source.

Every module under src/lmforge is parsed with `ast`; imports inside functions count as much
as those at the top (a lazy import still makes a dependency, and hides a cycle). Each module
belongs to a component (the longest entry of LAYERS that prefixes its name), each component to
a layer, and:

- a module imports only from its own component or from a lower layer (in the one layer of
  peers, the stages, components may also use each other);
- the components form no cycle, and neither do the modules;
- no module imports another module's private (`_x`) name.

Every violation is listed in the failure message.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# Bottom to top. A component is a package or a module, named without the `lmforge.` prefix
# ("" is the `lmforge` package itself, whose `load` is `loaded`'s).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "atomic", "cache", "console_text", "plotting"),  # depend on nothing of lmforge
    ("config",),
    ("native", "interop.safetensors_io"),               # C kernels; validated safetensors bytes
    ("interop.families",),                              # per-family Hugging Face names and config keys
    ("interop.hf",),
    ("model", "compress.qlinear", "compress.sparse_format"),  # the Transformer, its layers (quantized too), pruned forms
    ("data",),
    ("train.losses",),                                  # the LM loss that training and eval share
    ("infer", "interop.weights"),
    ("model_files",),                                   # the model directory's files: names, index, hashes, JSON, tokenizer
    ("interop.crypto",),                                # weights sealed at rest
    ("compress.ecosystem",),                            # quantized layers in the compressed-tensors layout
    ("compress.storage",),                              # weights quantized on disk (maybe sealed too)
    ("compress.sparse",),                               # pruned weights stored compactly
    ("model_dir",),                                     # load and save any model directory
    ("loaded",),                                        # lmforge.load()
    ("adapters",),                                      # LoRA adapters: PEFT names and adapter files
    ("",),                                              # the lmforge package: load, LmforgeError
    ("train", "compress", "interop", "eval", "explain", "serve"),  # the stages
    ("quickstart", "applications"),                    # whole paths through the stages
    ("cli",),
    ("__main__",),
]
PEERS = ("train", "compress", "interop", "eval", "explain", "serve")
# Components held to a shorter list than their layer allows (docs/architecture.md): the model
# runs on its config and the C kernels only, so any stage can use it without dragging others in.
ONLY: dict[str, tuple[str, ...]] = {"model": ("config", "errors", "native")}

# Imports that break the rule today, each with why it is not fixed yet. The test fails when
# one of them is gone (drop it from here) or when a new one appears.
KNOWN: dict[tuple[str, str], str] = {
}
KNOWN_PRIVATE: dict[tuple[str, str, str], str] = {
}


@dataclass(frozen=True)
class Import:
    source: str   # the importing module, e.g. "infer.native_decode"
    target: str   # the imported module
    name: str     # the imported name ("" for `import x` or a module)
    line: int
    type_only: bool = False  # under `if TYPE_CHECKING:`: a dependency, but no cycle at run time

    def __str__(self) -> str:
        what = ".".join(p for p in ("lmforge", self.target, self.name) if p)
        return f"{_path(self.source)}:{self.line} imports {what}"


def _path(module: str) -> str:
    return "src/lmforge/" + _modules()[module].relative_to(SRC).as_posix()


_CACHE: dict[str, Path] = {}


def _modules() -> dict[str, Path]:
    if not _CACHE:
        for path in sorted(SRC.rglob("*.py")):
            parts = list(path.relative_to(SRC).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            _CACHE[".".join(parts)] = path
    return _CACHE


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def _imports() -> list[Import]:
    modules = _modules()
    out = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        type_only = _type_checking_lines(tree)
        found: list[Import] = []
        bound: dict[str, str] = {}  # local name -> lmforge module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "lmforge" or alias.name.startswith("lmforge."):
                        target = alias.name.removeprefix("lmforge").lstrip(".")
                        found.append(Import(module, target, "", node.lineno))
                        if alias.asname:
                            bound[alias.asname] = target
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module == "lmforge" or (node.module or "").startswith("lmforge."):
                    target = node.module.removeprefix("lmforge").lstrip(".")
                else:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    if sub in modules:
                        found.append(Import(module, sub, "", node.lineno))
                        bound[alias.asname or alias.name] = sub
                    else:
                        found.append(Import(module, target, alias.name, node.lineno))
        for node in ast.walk(tree):  # `from lmforge.x import y` then `y._private`
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
                found.append(Import(module, bound[node.value.id], node.attr, node.lineno))
        out += [Import(i.source, i.target, i.name, i.line, i.line in type_only) for i in found]
    return out


def _component(module: str) -> str:
    names = [c for layer in LAYERS for c in layer]
    matches = [c for c in names if c and (module == c or module.startswith(c + "."))]
    if not matches:
        assert module == "", f"{module} belongs to no component of LAYERS; add it to the table"
        return ""
    return max(matches, key=len)


def _layer(component: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if component in layer)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; the components with more than one node (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_known(imp: Import) -> bool:
    return (imp.source, imp.target) in KNOWN


def layer_violations(imports: list[Import]) -> list[str]:
    out = []
    for imp in imports:
        src, dst = _component(imp.source), _component(imp.target)
        if src == dst or _is_known(imp):
            continue
        if src in ONLY and dst not in ONLY[src]:
            out.append(f"{imp}: {src} may import only {', '.join(ONLY[src])}")
            continue
        if _layer(dst) < _layer(src) or (src in PEERS and dst in PEERS):
            continue
        out.append(f"{imp}: {src or 'lmforge'} (layer {_layer(src)}) may not import "
                   f"{dst or 'lmforge'} (layer {_layer(dst)})")
    return out


def cycle_violations(imports: list[Import]) -> list[str]:
    out = []
    for level, key in (("components", _component), ("modules", lambda m: m)):
        graph: dict[str, set[str]] = {}
        edges: dict[tuple[str, str], Import] = {}
        for imp in imports:
            a, b = key(imp.source), key(imp.target)
            if a == b or _is_known(imp) or imp.type_only or (level == "modules" and _package_and_its_module(a, b)):
                continue
            graph.setdefault(a, set()).add(b)
            edges.setdefault((a, b), imp)
        for scc in _strongly_connected(graph):
            inside = [str(edges[a, b]) for a in scc for b in sorted(graph[a]) if b in scc]
            out.append(f"cycle between {level} {', '.join(n or 'lmforge' for n in scc)}: " + "; ".join(inside))
    return out


def _package_and_its_module(a: str, b: str) -> bool:
    """A package's __init__ that registers its own modules (interop.families, data.clean.filters),
    and those modules taking the base class from it, are one unit, not a cycle."""
    return a.startswith(b + ".") or b.startswith(a + ".")


def private_violations(imports: list[Import]) -> list[str]:
    return [f"{imp}: a private name of another module (make it public, or move it where it is used)"
            for imp in imports
            if imp.name.startswith("_") and not imp.name.startswith("__") and imp.target != imp.source
            and (imp.source, imp.target, imp.name) not in KNOWN_PRIVATE]


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(_component(module))


def test_imports_point_down():
    found = layer_violations(_imports())
    assert not found, f"{len(found)} import(s) point up (docs/architecture.md, Package layout):\n" + "\n".join(found)


def test_no_import_cycles():
    found = cycle_violations(_imports())
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(found)


def test_no_private_names_across_modules():
    found = private_violations(_imports())
    assert not found, f"{len(found)} private name(s) imported:\n" + "\n".join(found)


def test_known_exceptions_still_exist():
    """An exception that no longer occurs is dropped from KNOWN, so the rule tightens."""
    imports = _imports()
    edges = {(i.source, i.target) for i in imports}
    names = {(i.source, i.target, i.name) for i in imports}
    stale = [f"{a} -> {b}" for a, b in KNOWN if (a, b) not in edges]
    stale += [f"{a} -> {b}.{n}" for a, b, n in KNOWN_PRIVATE if (a, b, n) not in names]
    assert not stale, "known exceptions that no longer occur (remove them from KNOWN):\n" + "\n".join(stale)


def test_the_checks_catch_what_they_guard():
    """The rule itself: an upward import, one outside a short list, a cycle and a private name
    are each reported."""
    up = Import("data.loader", "train.trainer", "run", 1)
    back = Import("train.trainer", "data.loader", "BatchLoader", 2)
    sideways = Import("model.transformer", "interop.hf", "weight_map", 3)  # a lower layer, not on model's list
    cycle_a = Import("data.loader", "data.prepare", "read_index", 4)
    cycle_b = Import("data.prepare", "data.loader", "TokenSplit", 5)
    private = Import("infer.engine", "infer.slots", "_free", 6)
    found = layer_violations([up, back, sideways])
    assert len(found) == 2
    assert found[0].startswith(f"{up}: data (layer ") and "may not import train (layer " in found[0]
    assert "model may import only config, errors, native" in found[1]
    cycles = cycle_violations([cycle_a, cycle_b, back])
    assert len(cycles) == 1 and "modules data.loader, data.prepare" in cycles[0]
    assert len(cycle_violations([up, back])) == 2  # data <-> train, and the two modules
    assert private_violations([private, back]) == [f"{private}: a private name of another module "
                                                   "(make it public, or move it where it is used)"]
