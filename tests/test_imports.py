"""Imports go one way: no module of ``lns_jax/`` imports one that imports it back.

The test reads every ``.py`` under ``lns_jax/`` with :mod:`ast` (nothing is imported)
and draws an edge A -> B for every ``import`` / ``from ... import`` of an ``lns_jax``
module B anywhere in A, at the top or inside a function: a lazy import still runs the
other module, so it is part of the graph. How a statement becomes edges:

* ``import lns_jax.x.y`` and ``from lns_jax.x import y`` where ``y`` is a submodule:
  an edge to ``lns_jax.x.y``; ``from lns_jax.x import name`` where ``name`` is not a
  submodule: an edge to ``lns_jax.x`` (its ``__init__.py``, which defines or re-exports
  the name). Relative imports are resolved the same way.
* Importing ``lns_jax.x.y`` first runs the package ``lns_jax.x``'s ``__init__.py``, so
  it is also an edge to ``lns_jax.x`` -- unless that package contains the importing
  module (its ``__init__`` is already running: a submodule of ``lns_jax.data``
  importing a sibling does not depend on ``lns_jax/data/__init__.py``).

The floors, lowest first (each module imports only from the floors below it):

1. ``errors`` (:class:`ConfigError`), ``supervisor`` (the standard library only),
   ``quantizers``, ``bitpack``, ``data.defaults``: no lns_jax imports; ``mapping`` and
   ``loss`` (the float cast from ``quantizers``); ``parallel`` (the heartbeat setting
   from ``supervisor``);
2. the method: ``xnor_conv`` -> ``layers`` -> ``binary`` -> ``stages`` -> ``optim``,
   ``workdir``; ``metrics``; the package ``lns_jax`` (layers, loss, mapping, quantizers,
   and the helpers for one's own model from binary and optim);
3. the data: ``data.specs`` -> ``data.files`` -> ``data.build`` (TFDS, the quiet start-up)
   -> ``data.augment``, ``data.splits`` -> ``data.numpy_loader`` -> ``data.pipeline``
   -> the package ``lns_jax.data``;
4. ``models`` (``models.common`` -> the networks -> the package), ``checkpoint``,
   ``reporting`` -> ``plots``;
5. ``config``: it reads the allowed values from the modules that implement them;
6. the entry points: ``cli``, ``distill`` (the teacher: config, checkpoint, models)
   -> ``trainer``, ``summary``, ``ablation`` -> ``export`` -> ``inference``.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Optional, Set

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lns_jax")
PACKAGE = "lns_jax"


def modules(root: str = ROOT) -> Dict[str, str]:
  """``{'lns_jax.data.specs': path}`` for every .py under ``root`` (packages as their name)."""
  found = {}
  base = os.path.dirname(root)
  for dirpath, _, files in os.walk(root):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(dirpath, f)
      parts = os.path.relpath(path, base)[:-3].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      found[".".join(parts)] = path
  return found


def _prefixes(name: str) -> List[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def edges(name: str, path: str, known: Set[str]) -> Set[str]:
  """The lns_jax modules that module ``name`` (file ``path``) imports, by the rules above."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  is_package = os.path.basename(path) == "__init__.py"
  here = name if is_package else name.rpartition(".")[0]  # the package `from .` means
  ancestors = set(_prefixes(name)) | ({name} if is_package else set())
  targets: Set[str] = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = here.split(".")
        base = base[:len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      for alias in node.names:
        sub = f"{module}.{alias.name}"
        targets.add(sub if sub in known else module)
  out = set()
  for target in targets:
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
      continue
    assert target in known, f"{name} imports {target}, which is not a module of {PACKAGE}/"
    out.add(target)
    out.update(p for p in _prefixes(target) if p not in ancestors)  # the packages it runs
  out.discard(name)
  return out


def graph(root: str = ROOT) -> Dict[str, Set[str]]:
  known = modules(root)
  return {name: edges(name, path, set(known)) for name, path in sorted(known.items())}


def find_cycle(g: Dict[str, Set[str]]) -> Optional[List[str]]:
  """One cycle ``[a, b, ..., a]`` of ``g``, or None (depth-first, in sorted order)."""
  state: Dict[str, int] = {}  # 1 on the current path, 2 done
  stack: List[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(g.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(g):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def all_cycles(g: Dict[str, Set[str]]) -> List[List[str]]:
  """A cycle through every strongly connected part of ``g`` that has one (for the message)."""
  cycles, g = [], {k: set(v) for k, v in g.items()}
  while True:
    cycle = find_cycle(g)
    if cycle is None:
      return cycles
    cycles.append(cycle)
    g[cycle[0]].discard(cycle[1])  # break it and look again


def test_the_walk_sees_every_kind_of_import(tmp_path):
  pkg = tmp_path / "lns_jax"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("from lns_jax.a import X\n__version__ = '0'\n")
  (pkg / "a.py").write_text("import os\nX = 1\n")
  (pkg / "b.py").write_text("def f():\n  from lns_jax import a, __version__\n")
  (pkg / "c.py").write_text("from . import b\nfrom .sub.s import Y\n")
  (pkg / "sub" / "__init__.py").write_text("from lns_jax.sub.s import Y\n")
  (pkg / "sub" / "s.py").write_text("from lns_jax.sub import t\nfrom ..a import X\nY = 2\n")
  (pkg / "sub" / "t.py").write_text("import lns_jax.c\n")
  g = graph(str(pkg))
  assert g == {
      "lns_jax": {"lns_jax.a"},
      "lns_jax.a": set(),
      "lns_jax.b": {"lns_jax.a", "lns_jax"},  # in a function; __version__: the package
      "lns_jax.c": {"lns_jax.b", "lns_jax.sub.s", "lns_jax.sub"},  # relative; runs sub/__init__
      "lns_jax.sub": {"lns_jax.sub.s"},
      "lns_jax.sub.s": {"lns_jax.sub.t", "lns_jax.a"},  # its own package's __init__ is no edge
      "lns_jax.sub.t": {"lns_jax.c"},
  }
  assert find_cycle(g) == [
      "lns_jax.c", "lns_jax.sub", "lns_jax.sub.s", "lns_jax.sub.t", "lns_jax.c"]
  (pkg / "sub" / "t.py").write_text("import os\n")
  assert find_cycle(graph(str(pkg))) is None


def test_imports_go_one_way():
  g = graph()
  assert len(g) > 20 and "lns_jax.config" in g and "lns_jax.data.specs" in g
  cycles = all_cycles(g)
  assert not cycles, "import cycles in lns_jax/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_shared_pieces_keep_their_old_names():
  from lns_jax import cli, config, errors
  from lns_jax.data import build, files, numpy_loader
  assert config.ConfigError is errors.ConfigError
  assert issubclass(build.LoaderUnavailableError, config.ConfigError)
  assert cli.quiet_environment is build.quiet_environment and cli.QUIET_ENV is build.QUIET_ENV
  for name in ("load", "prepare", "read_cifar10", "read_idx", "split_sizes", "tfds_order"):
    assert getattr(numpy_loader, name) is getattr(files, name)
