"""The package's layers, read from its source with `ast` (nothing is imported).

Layers, lowest first; a module may import mtjax modules of its own package and
of lower layers only:

  0  registry, paths                name -> class/function tables; run
                                    outputs on local disks and gs:// alike
  1  models, data, distributed      base models; seqio data; multi-process glue
  2  methods                        pure transforms, the expert library
  3  merging                        task-vector / LoRA merges, learned merges
  4  routing                        scores, kernels, routed LoRA, routers
  5  training                       the one fit loop, step, optimizer, ckpts
  6  evaluation                     rank classification, generation, results
  7  experiments                    one module per pipeline
  8  main                           the command line

A failure names the file and line of the offending import.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "mtjax"
LAYERS = (("registry", "paths"), ("models", "data", "distributed"), ("methods",),
          ("merging",), ("routing",), ("training",), ("evaluation",),
          ("experiments",), ("main",))
LAYER_OF = {pkg: i for i, pkgs in enumerate(LAYERS) for pkg in pkgs}


def _module_name(path):
  parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules():
  return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(tree, modules):
  """[(mtjax module imported, line, at module level?, node)] of a module."""
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(
          child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        for alias in child.names:
          out.append((alias.name, child.lineno, not in_function, child))
      elif isinstance(child, ast.ImportFrom) and child.module:
        for alias in child.names:
          full = f"{child.module}.{alias.name}"
          name = full if full in modules else child.module
          out.append((name, child.lineno, not in_function, child))
      visit(child, nested)

  visit(tree, False)
  return out


def _package(module):
  """'mtjax.methods.lora' -> 'methods'; 'mtjax.main' -> 'main'."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _edges():
  modules = _modules()
  edges = []
  for name, path in modules.items():
    tree = ast.parse(path.read_text(), str(path))
    for target, line, top, node in _imports(tree, modules):
      edges.append((name, path, target, line, top, node))
  return modules, edges


def test_every_package_has_a_layer():
  modules = _modules()
  unknown = sorted({_package(m) for m in modules if m != "mtjax"} -
                   set(LAYER_OF))
  assert not unknown, (f"mtjax packages {unknown} have no layer: add them to "
                       "LAYERS in tests/test_layering.py and the README")


def test_no_function_level_imports_of_mtjax():
  _, edges = _edges()
  bad = [f"{p}:{line}: imports {t} inside a function"
         for _, p, t, line, top, _ in edges
         if t.startswith("mtjax") and not top]
  assert not bad, ("function-level imports of mtjax hide cycles; move them "
                   "to the top of the module:\n" + "\n".join(bad))


def test_function_level_third_party_imports_say_why():
  """Lazy imports of heavy optional packages are allowed with a comment."""
  _, edges = _edges()
  bad = []
  for name, path, target, line, top, node in edges:
    if top or target.startswith("mtjax"):
      continue
    text = path.read_text().splitlines()[line - 1]
    if "#" not in text:
      bad.append(f"{path}:{line}: lazy import of {target} without a reason")
  assert not bad, ("a function-level import needs a one-line reason as a "
                   "comment (e.g. '# heavy, optional'):\n" + "\n".join(bad))


def test_imports_only_go_down_the_layers():
  _, edges = _edges()
  bad = []
  for name, path, target, line, _, _ in edges:
    if not target.startswith("mtjax.") or name == "mtjax":
      continue
    src, dst = _package(name), _package(target)
    if src == dst:
      continue
    if LAYER_OF[dst] >= LAYER_OF[src]:
      bad.append(f"{path}:{line}: {name} (layer {LAYER_OF[src]}, {src}) "
                 f"imports {target} (layer {LAYER_OF[dst]}, {dst})")
  assert not bad, ("imports must go to lower layers only (see "
                   "tests/test_layering.py):\n" + "\n".join(bad))


def _cycles(graph):
  """Strongly connected components of more than one node (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in list(graph):
    if v not in index:
      strong(v)
  return out


def test_no_import_cycles():
  modules, edges = _edges()
  graph = {}
  for name, _, target, _, _, _ in edges:
    if target in modules and target != name:
      # A package's __init__ importing its own submodules is not a cycle.
      if name != "mtjax" and not target.startswith(name + "."):
        graph.setdefault(name, set()).add(target)
  cycles = _cycles(graph)
  assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("graph,expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}}, []),
])
def test_cycle_finder_finds_cycles(graph, expected):
  assert _cycles(graph) == expected
