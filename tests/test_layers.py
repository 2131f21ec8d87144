"""The three layers are real: numerics imports no Spark/Delta, imports only go down, and nothing is circular."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PKG = REPO / "bclib"
LAYER_OF = {"numerics": 0, "tables": 1, "steps": 2}
# top-level modules: errors (everyone), config (settings), storage (object-store options per library, pure),
# config_reference (the config page, from config alone), spark (the session: below tables), serving (chains
# for online use: numerics, and the registry to export),
# api (the notebook face over the steps), cli (entry point). The package face `bclib` hands the api out lazily.
TOP_RANK = {"bclib": -1, "bclib.errors": -1, "bclib.storage": -1, "bclib.config": -1, "bclib.config_reference": -0.5,
            "bclib.spark": 0.5, "bclib.serving": 1.5, "bclib.api": 2.5, "bclib.cli": 3}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _rank(module: str) -> float:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYER_OF:
        return LAYER_OF[parts[1]]
    return TOP_RANK[module]


def _imports(path: Path, *, include_type_checking: bool = False) -> set[str]:
    """Absolute module names imported anywhere in the file (also inside functions), except TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    if not include_type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


NUMERICS = sorted(m for m in _modules() if m.startswith("bclib.numerics"))


@pytest.mark.parametrize("module", NUMERICS)
def test_numerics_never_imports_spark_or_delta(module):
    bad = {m for m in _imports(_modules()[module], include_type_checking=True)
           if m.split(".")[0] in ("pyspark", "delta", "py4j")}
    assert not bad, f"{module} imports {sorted(bad)}"


def _run_with_blocked_imports(blocked: tuple[str, ...], body: str) -> str:
    """Run `body` in a fresh interpreter where the top-level packages `blocked` cannot be imported; its stdout."""
    code = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n" + body
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_numerics_imports_with_spark_and_delta_unimportable():
    """Every numerics module imports in a fresh interpreter where pyspark, delta and py4j cannot be imported."""
    body = (
        f"for m in {NUMERICS!r}:\n"
        "    importlib.import_module(m)\n"
        "assert not any(k.split('.')[0] in ('pyspark', 'delta', 'py4j') for k in sys.modules)\n"
        "print('ok')\n"
    )
    assert _run_with_blocked_imports(("pyspark", "delta", "py4j"), body) == "ok"


def test_imports_only_go_down():
    violations = []
    for module, path in _modules().items():
        for target in _imports(path):
            if not target.startswith("bclib"):
                continue
            target = target if target in _modules() else target.rsplit(".", 1)[0]
            if target == module or target not in _modules():
                continue
            if _rank(target) > _rank(module):
                violations.append(f"{module} (layer {_rank(module)}) imports {target} (layer {_rank(target)})")
    assert not violations, "\n".join(violations)


def test_no_import_cycles():
    graph = {m: {t for t in _imports(p) if t in _modules() and t != m} for m, p in _modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_executor_kernel_needs_only_numpy_and_pyarrow():
    """What executors unpickle (the kernel and the batch function) imports no torch, matplotlib, pandas or Spark."""
    body = (
        "import numpy as np, pyarrow as pa\n"
        "from bclib.numerics.kernel import MultiSpaceKernel, make_batch_fn\n"
        "from bclib.numerics.serialization import transform_from_bytes, transform_to_bytes\n"
        "from bclib.numerics.transforms import AffineTransform\n"
        "k = MultiSpaceKernel(3, {0: [AffineTransform(np.eye(3)[:, :2])]})\n"
        "from bclib.numerics.arrow import matrix_to_list\n"
        "b = pa.RecordBatch.from_arrays([pa.array([1]), matrix_to_list(np.ones((1, 3), np.float32))], ['id', 'vector'])\n"
        "out = list(make_batch_fn(k)(iter([b])))\n"
        "assert out[0].column(1).to_pylist() == [[1.0, 1.0]]\n"
        "print('ok')\n"
    )
    assert _run_with_blocked_imports(("torch", "matplotlib", "pandas", "pyspark", "delta", "yaml"), body) == "ok"
