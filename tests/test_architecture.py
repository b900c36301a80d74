"""The layers of docs/architecture.md hold: the import graph (lazy imports inside functions included) has no cycle
and no edge from the library to a tool, a launcher or dataset preparation; importing the library and the trainer
loads neither PyAV nor the preparation modules."""

import ast
import os
import subprocess
import sys

from avt_jax import config_lib

REPO = config_lib.REPO
PACKAGES = ("avt_jax", "data", "launch", "bench")
# Command-line programs inside the package: they use the library, nothing in the library uses them.
TOOLS = {"avt_jax.main", "avt_jax.predict", "avt_jax.summary", "avt_jax.bench", "avt_jax.convert_release",
         "avt_jax.embed"}
# The clip extraction of dataset preparation, which predict runs on new videos (the same code made the records).
EXTRACTION = {"data.extract", "data.face", "data.logmel", "data.media"}


def _modules() -> dict[str, str]:
  out = {}
  for package in PACKAGES:
    for root, dirs, files in os.walk(os.path.join(REPO, package)):
      dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].split(os.sep)
          name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
          out[name] = os.path.join(root, f)
  return out


def _graph() -> dict[str, set[str]]:
  """Module -> project modules it imports anywhere in its file (top level or inside functions)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    edges = set()
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parent = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parent + ([base] if base else []))
        # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      for target in targets:
        while target and target not in modules:
          target = target.rpartition(".")[0]
        if target and target != name:
          edges.add(target)
    graph[name] = edges
  return graph


def _layer(module: str) -> str:
  if module in TOOLS:
    return "tool"
  return {"avt_jax": "library", "data": "preparation", "launch": "launcher",
          "bench": "benchmark"}[module.split(".")[0]]


def test_layers_are_respected():
  graph = _graph()
  assert "avt_jax.train" in graph and "avt_jax.tasks.pretrain" in graph and "data.prepare" in graph
  allowed = {
      "library": {"library"},
      "preparation": {"library", "preparation"},
      "tool": {"library"},
      "launcher": {"library", "launcher"},
      "benchmark": {"library", "preparation"},  # bench/ times the library and the preparation
  }
  bad = []
  for module, edges in sorted(graph.items()):
    for target in sorted(edges):
      src, dst = _layer(module), _layer(target)
      if dst in allowed[src]:
        continue
      if module == "avt_jax.predict" and target in EXTRACTION:
        continue
      if src == "launcher" and target == "data.folds":  # the sweep builds its label subsets from the folds
        continue
      bad.append(f"{module} ({src}) -> {target} ({dst})")
  assert not bad, "imports across layers:\n" + "\n".join(bad)


def test_import_graph_has_no_cycle():
  graph = _graph()
  # Tarjan's strongly connected components; any component with two or more modules is a cycle.
  index, low, on_stack, stack, cycles = {}, {}, set(), [], []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
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

  sys.setrecursionlimit(10000)
  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_lazy_imports():
  # A cycle through an import inside a function is still a cycle: the walk must see such imports.
  graph = _graph()
  assert "avt_jax.checkpointing" in graph["avt_jax.predict"]   # imported inside Predictor.__init__
  assert "data.folds" in graph["launch.sweep"]                  # imported inside ensure_subsets


def test_library_and_trainer_import_neither_pyav_nor_preparation():
  library = sorted(m for m in _modules() if m.startswith("avt_jax") and m not in TOOLS - {"avt_jax.main"})
  code = ("import sys\n"
          f"for m in {library!r}:\n"
          "  __import__(m)\n"
          "bad = sorted(m for m in sys.modules if m == 'av' or m.startswith('av.') or m == 'data' "
          "or m.startswith('data.'))\n"
          "print(len(sys.modules), bad)\n"
          "sys.exit(1 if bad else 0)\n")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  # The tool that decodes video does load them: the check above would see them.
  proc = subprocess.run([sys.executable, "-c", "import sys, avt_jax.predict; print('av' in sys.modules)"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.stdout.strip() == "True", proc.stderr[-2000:]
