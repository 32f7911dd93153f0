"""The documentation: the Sphinx site builds with warnings as errors, every
public name is in its API reference with a docstring that states its
parameters, and the README's quickstart runs as written."""
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.md")

# The modules whose public names (their __all__) the API reference covers,
# and the framework each needs (None: only the package's own dependencies).
MODULES = {
    "expectigrad_np": None,
    "expectigrad_np.schedules": None,
    "expectigrad_np.reference": None,
    "expectigrad_np.checkpoint": None,
    "expectigrad_np.sparse": None,
    "expectigrad_np.cuda": None,
    "expectigrad_np.pytorch": "torch",
    "expectigrad_np.tensorflow2": "keras",
    "expectigrad_np.tensorflow1": "tensorflow",
    "expectigrad_np.mpi": "mpi4py",
}


def has(module):
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The HTML site, built once: (return code, output, folder)."""
    if not (has("sphinx") and has("myst_parser")):
        pytest.skip("sphinx or myst-parser is not installed (pip install 'expectigrad_np[docs]')")
    out = tmp_path_factory.mktemp("html")
    run = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
                          "-d", str(tmp_path_factory.mktemp("doctrees")), DOCS, str(out)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    return run.returncode, run.stdout + run.stderr, out


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(site):
    rc, output, out = site
    warnings = [line for line in output.splitlines()
                if ("WARNING" in line or "ERROR" in line) and "absl::" not in line]
    assert rc == 0, "sphinx-build -W failed:\n" + "\n".join(warnings or output.splitlines()[-30:])
    for page in ("index", "getting-started", "why", "api", "performance", "guide/numpy",
                 "guide/minimize", "guide/schedules", "guide/reliability", "guide/gpu",
                 "guide/frontends", "guide/row-sparse", "guide/mpi"):
        assert (out / f"{page}.html").exists(), page
    # the figures the examples drew, and the machine the figures were measured on
    assert (out / "_images" / "adam_divergence.png").exists()
    assert (out / "_images" / "mlp_numpy.png").exists()
    assert "-core" in (out / "performance.html").read_text(encoding="utf-8")


def public_names(module):
    names = [n for n in module.__all__ if n != "__version__"]
    return [(f"{module.__name__}.{n}", getattr(module, n)) for n in names]


def parameters_of(obj):
    """The parameters a caller passes (without self/cls), or None if unknown."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [p for p in sig.parameters.values() if p.name not in ("self", "cls")]


def has_parameters_section(doc):
    return re.search(r"^Parameters\n-{10}", inspect.cleandoc(doc), flags=re.M) is not None


def docstring_problems(qualname, obj):
    """What is missing from the docstrings of a public object (and of the
    public methods and properties its class defines)."""
    problems = []
    if inspect.ismodule(obj):
        if not (obj.__doc__ or "").strip():
            problems.append(f"{qualname}: no module docstring")
        return problems
    if not (inspect.isclass(obj) or callable(obj)):
        return problems                       # data: documented in api.rst
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if not (doc or "").strip():
        return [f"{qualname}: no docstring"]
    params = parameters_of(obj)
    if params and not has_parameters_section(doc):
        problems.append(f"{qualname}: no 'Parameters' section for "
                        f"({', '.join(p.name for p in params)})")
    if inspect.isclass(obj):
        for name, member in vars(obj).items():
            if name.startswith("_"):
                continue
            where = f"{qualname}.{name}"
            if isinstance(member, property):
                if not (member.__doc__ or "").strip():
                    problems.append(f"{where}: property without a docstring")
            elif isinstance(member, (staticmethod, classmethod)) or inspect.isfunction(member):
                func = member.__func__ if isinstance(member, (staticmethod, classmethod)) \
                    else member
                mdoc = func.__doc__ or ""
                if not mdoc.strip():
                    problems.append(f"{where}: no docstring")
                    continue
                params = parameters_of(func)
                if params and not has_parameters_section(mdoc):
                    problems.append(f"{where}: no 'Parameters' section for "
                                    f"({', '.join(p.name for p in params)})")
    return problems


def load(modname):
    framework = MODULES[modname]
    if framework is not None and not has(framework):
        pytest.skip(f"{framework} is not installed: {modname} cannot be imported")
    return importlib.import_module(modname)


@pytest.mark.parametrize("modname", list(MODULES))
def test_public_names_have_docstrings_with_parameters(modname):
    module = load(modname)
    problems = []
    for qualname, obj in public_names(module):
        problems += docstring_problems(qualname, obj)
    assert not problems, "docstrings to complete:\n" + "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("modname", list(MODULES))
def test_public_names_are_in_the_api_reference(modname, site):
    module = load(modname)
    html = (site[2] / "api.html").read_text(encoding="utf-8")
    ids = set(re.findall(r'id="([\w.-]+)"', html))
    missing = [q for q, _ in public_names(module)
               if q not in ids and not (inspect.ismodule(getattr(module, q.rsplit(".", 1)[1]))
                                        and f"module-{q}" in ids)]
    if modname == "expectigrad_np":
        missing += [] if "expectigrad_np.__version__" in ids else ["expectigrad_np.__version__"]
    assert not missing, f"not in docs/api.rst: {missing}"


def test_docstring_check_catches_a_missing_section():
    def documented(a, b=1):
        """Add.

        Parameters
        ----------
        a, b : int
            The numbers.
        """

    def undocumented(a):
        """Add, without saying what ``a`` is."""

    class Widget:
        """A widget."""

        def spin(self, speed):
            pass

    assert docstring_problems("documented", documented) == []
    assert docstring_problems("undocumented", undocumented)
    assert docstring_problems("Widget", Widget) == ["Widget.spin: no docstring"]


# The README's quickstart: the first ```python block under "## Quickstart".
def readme_quickstart():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README.md: no python block under '## Quickstart'"
    return match.group(1)


def test_readme_quickstart_is_short_and_self_contained():
    code = readme_quickstart()
    assert len(code.strip().splitlines()) <= 25
    compile(code, "README quickstart", "exec")
    imports = set(re.findall(r"^(?:import|from) (\w+)", code, flags=re.M))
    assert imports <= {"numpy", "expectigrad_np"}, imports


def test_readme_quickstart_runs_and_the_loss_falls(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(textwrap.dedent(readme_quickstart()), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    # The first step compiles the kernels when the cache is empty (10-15 s a dtype).
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    losses = [float(v) for v in re.findall(r"loss ([0-9.eE+-]+)", run.stdout)]
    assert len(losses) >= 2, run.stdout
    assert losses[-1] < 1e-3 * losses[0], run.stdout
