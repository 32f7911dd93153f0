"""The shape of the package: backends are peers behind one interface, the
numpy backend needs no numba, there are no import circles, param groups
keep their guard through copies, and an optimizer is freed by ``del``."""
import ast
import copy
import gc
import inspect
import pickle
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

import expectigrad_np as eg
from expectigrad_np.backends import base, bucket_class

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "expectigrad_np"
INTERFACE = ("load_gradients", "set_coefficients", "step", "read_state", "write_state",
             "ensure_momentum")


def _run(code, **env):
    import os
    environ = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environ, timeout=600)


@pytest.mark.parametrize("name", ["numpy", "cpu"])
def test_host_backends_implement_the_interface_with_its_signatures(name):
    cls = bucket_class(name)
    assert issubclass(cls, base.Bucket)
    for method in INTERFACE:
        assert inspect.signature(getattr(cls, method)) == \
            inspect.signature(getattr(base.Bucket, method)), (name, method)
    assert not inspect.isabstract(cls)


def test_cuda_backend_implements_the_interface_with_its_signatures():
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed "
                        "(pip install 'expectigrad_np[cuda]')")
    code = (
        "import inspect\n"
        "from expectigrad_np.backends import base, bucket_class\n"
        "cls = bucket_class('cuda')\n"
        f"for m in {INTERFACE!r}:\n"
        "    a = inspect.signature(getattr(cls, m))\n"
        "    b = inspect.signature(getattr(base.Bucket, m))\n"
        "    assert a == b, (m, a, b)\n"
        "assert issubclass(cls, base.Bucket) and not inspect.isabstract(cls)\n"
        "print('ok')\n")
    proc = _run(code, NUMBA_ENABLE_CUDASIM="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_an_incomplete_backend_cannot_be_built():
    class Half(base.Bucket):
        def load_gradients(self, grads, ids=None):
            pass
    with pytest.raises(TypeError):
        Half(np.float64, [0], [np.zeros(3)], ["p"], [True], [True])


_NO_NUMBA = """
import sys
sys.modules["numba"] = None            # any import of numba now fails
import numpy as np, expectigrad_np as eg
rng = np.random.default_rng(0)
x = np.linspace(-1, 1, 37).astype(np.{dtype})
opt = eg.Expectigrad([x], lr=0.01, clipvalue=0.5, backend="{backend}")
for t in range(5):
    g = rng.standard_normal(37).astype(np.{dtype}); g[::4] = 0
    opt.step([g])
assert "numba" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
print(opt.backend)
sys.stdout.write(x.tobytes().hex())
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_backend_runs_without_numba_and_gives_the_cpu_bits(dtype):
    for backend in ("numpy", "auto"):
        proc = _run(_NO_NUMBA.format(dtype=dtype, backend=backend))
        assert proc.returncode == 0, proc.stderr[-3000:]
        used, hexbits = proc.stdout.split("\n")
        assert used == "numpy"              # auto falls back without numba
        rng = np.random.default_rng(0)
        x = np.linspace(-1, 1, 37).astype(dtype)
        opt = eg.Expectigrad([x], lr=0.01, clipvalue=0.5, backend="cpu")
        for _ in range(5):
            g = rng.standard_normal(37).astype(dtype)
            g[::4] = 0
            opt.step([g])
        assert bytes.fromhex(hexbits) == x.tobytes()


def _imports(path, module):
    """Package-internal modules that ``module`` (at ``path``) imports, at any depth."""
    tree = ast.parse(path.read_text())
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_mod = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base_mod}.{node.module}" if node.module else base_mod
            else:
                target = node.module or ""
            if target.startswith("expectigrad_np"):
                # ``from pkg import name``: the submodule ``pkg.name`` where
                # there is one, else ``pkg`` itself (test_no_import_circles
                # keeps only names that are modules).
                for alias in node.names:
                    found.add(f"{target}.{alias.name}")
                    if not (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")).exists() \
                            and not (PACKAGE.parent / (f"{target}.{alias.name}".replace(".", "/")
                                                       + ".py")).exists():
                        found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("expectigrad_np"))
    return found


def test_no_import_circles():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph = {m: {t for t in _imports(p, m) if t in modules and t != m}
             for m, p in modules.items()}
    # A package's __init__ is run by importing anything inside it, but that
    # is not an arrow from the inner module back: only explicit imports count.
    state, cycle = {}, []

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycle.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycle, cycle


def test_the_cycle_detector_finds_a_circle(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("from expectigrad_np import optimizer\n")
    assert "expectigrad_np.optimizer" in _imports(a, "expectigrad_np.a")


def test_shared_layout_and_numpy_backend_import_no_numba():
    proc = _run("import sys; sys.modules['numba'] = None\n"
                "import expectigrad_np.backends.layout, expectigrad_np.backends.numpy\n"
                "import expectigrad_np.backends.base\nprint('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_param_groups_keep_their_guard_after_copies(how):
    x = np.zeros(4)
    opt = eg.Expectigrad([x], lr=0.1)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    group = twin.param_groups[0]
    assert isinstance(group, eg.ParamGroup)
    with pytest.raises(ValueError, match="lr must be finite"):
        group["lr"] = float("nan")
    with pytest.raises(ValueError, match="beta must be in"):
        group |= {"beta": 5.0}
    group["lr"] = 1.0                       # a valid change reaches the copy's steps
    y = twin.params[0]
    twin.step([np.ones(4)])
    np.testing.assert_allclose(y, -1.0)
    assert np.all(x == 0)                   # the original is untouched


def test_a_group_update_is_checked_whole_before_anything_changes():
    opt = eg.Expectigrad([np.zeros(3)], lr=0.1, beta=0.5)
    group = opt.param_groups[0]
    with pytest.raises(ValueError):
        group |= {"lr": 0.5, "beta": 5.0}
    with pytest.raises(ValueError):
        group.update(lr=0.5, beta=float("nan"))
    assert group["lr"] == 0.1 and group["beta"] == 0.5


def test_group_params_cannot_be_changed():
    a, b = np.zeros(3), np.zeros(3)
    opt = eg.Expectigrad([a])
    params = opt.param_groups[0]["params"]
    with pytest.raises(ValueError, match="cannot be changed"):
        params.append(b)
    with pytest.raises(ValueError, match="cannot be changed"):
        params[0] = b
    with pytest.raises(ValueError, match="cannot be changed"):
        opt.param_groups[0]["params"] = [b]
    assert len(opt.param_groups[0]["params"]) == 1


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_an_optimizer_is_freed_by_del_alone(backend):
    gc.collect()
    gc.disable()
    try:
        opt = eg.Expectigrad([np.zeros(1000), np.zeros(5, np.float32)], backend=backend)
        opt.step([np.ones(1000), np.ones(5, np.float32)])
        opt.param_groups[0]["lr"] = 0.5
        opt.step([np.ones(1000), np.ones(5, np.float32)])
        ref = weakref.ref(opt)
        del opt
        assert ref() is None
    finally:
        gc.enable()


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install 'expectigrad_np[test]')")
    proc = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_one_version_source():
    from importlib.metadata import version
    assert eg.__version__ == version("expectigrad_np")
    import re
    assert not re.search(r'^version\s*=\s*"', (ROOT / "pyproject.toml").read_text(), re.M)
