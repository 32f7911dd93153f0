"""Local Sphinx extension of the expectigrad_np documentation.

- At ``builder-inited`` it runs ``examples/adam_divergence.py`` and
  ``examples/mlp_numpy.py`` (with this Python, so the figures come from the
  code in the checkout) and puts their PNGs in ``docs/_generated/``, where
  "Why Expectigrad" shows them.  Without matplotlib the build stops with a
  clear message (``pip install ".[docs]"``).
- The ``bench`` directive renders a part of a recorded benchmark,
  ``docs/_data/bench.json`` (``python -m expectigrad_np bench --json``),
  ``bench_mpi.json`` (``bench --mpi --json``) and ``machine.json`` (the
  machine they ran on), as docutils nodes, so it works in reStructuredText
  and MyST pages alike::

      .. bench:: machine | rows | targets | extras | sparse | pytorch | models | mpi

``docs/_data/record.py`` records new figures.
"""
import json
import os
import subprocess
import sys

from docutils import nodes
from docutils.parsers.rst import Directive
from sphinx.errors import ExtensionError

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.dirname(HERE)
ROOT = os.path.dirname(DOCS)
DATA = os.path.join(DOCS, "_data")
GENERATED = os.path.join(DOCS, "_generated")

# example script, its options for the figure, the PNG it writes
FIGURES = [
    ("adam_divergence.py", ["--steps", "30000"], "adam_divergence.png"),
    ("mlp_numpy.py", ["--epochs", "300"], "mlp_numpy.png"),
]


def render_figures(app=None):
    """Run the examples that draw the figures; returns the PNG paths."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ExtensionError('the figures need matplotlib: pip install ".[docs]"') from e
    os.makedirs(GENERATED, exist_ok=True)
    env = dict(os.environ, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    paths = []
    for script, options, png in FIGURES:
        path = os.path.join(GENERATED, png)
        if os.path.exists(path):
            os.remove(path)
        out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script),
                              *options, "--out", GENERATED],
                             env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0 or not os.path.exists(path):
            raise ExtensionError(f"examples/{script} did not write {png}:\n"
                                 f"{out.stdout}\n{out.stderr}")
        # the example's own report, shown under its figure
        with open(path[:-4] + ".txt", "w") as f:
            f.write("\n".join(line for line in out.stdout.splitlines()
                              if not line.startswith("saved ")) + "\n")
        paths.append(path)
    return paths


def load(name):
    """A JSON record from docs/_data, or None where it was not recorded."""
    path = os.path.join(DATA, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def fmt(v, digits=3):
    """A figure as the bench's own table writes it."""
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def verdict(ok):
    return "met" if ok else "missed"


def table(header, rows):
    """A docutils table of plain-text cells."""
    tab = nodes.table()
    group = nodes.tgroup(cols=len(header))
    tab += group
    for _ in header:
        group += nodes.colspec(colwidth=1)

    def row(cells):
        r = nodes.row()
        for c in cells:
            entry = nodes.entry()
            entry += nodes.paragraph(text=str(c))
            r += entry
        return r

    head = nodes.thead()
    head += row(header)
    group += head
    body = nodes.tbody()
    for r in rows:
        body += row(r)
    group += body
    return [tab]


def bullets(items):
    lst = nodes.bullet_list()
    for text in items:
        item = nodes.list_item()
        item += nodes.paragraph(text=text)
        lst += item
    return [lst]


def para(text):
    return [nodes.paragraph(text=text)]


def machine_nodes(bench, info):
    """Where and with what the bench ran: its own record, completed by machine.json."""
    m = dict(bench["machine"])
    info = info or {}
    pk = info.get("packages", {})
    cpu = m.get("cpu") or info.get("cpu") or "an unrecorded CPU"
    cores = m.get("cpus") or info.get("logical_cpus")
    vm = " virtual machine" if info.get("virtual_machine") else ""
    system = m.get("system") or info.get("system")
    date = m.get("date") or info.get("date")
    text = (f"Measured{' on ' + date if date else ''} with python -m expectigrad_np bench "
            f"--json on a {cores}-core {cpu}{vm}{' (' + system + ')' if system else ''}: "
            f"Python {m['python']}, NumPy {m['numpy']}, Numba {m['numba']}, "
            f"{m['threads']} kernel threads")
    if pk:
        text += (f", torch {pk['torch']}" if pk.get("torch") else ", without torch")
        text += (", with the original project's package (expectigrad) installed, so the "
                 "NumPy reference is its expectigrad.testing.NumpyExpectigrad and the "
                 "PyTorch rows compare with its expectigrad.pytorch.Expectigrad"
                 if pk.get("expectigrad") else ", without the original project's package")
    text += "."
    if info.get("loadavg_at_start") is not None:
        text += (f" The 1-minute load average when the run started was "
                 f"{info['loadavg_at_start']:.2f}.")
    return para(text)


def rows_nodes(bench):
    header = ["N", "dtype", "step µs", "unchecked µs", "GB/s", "vs same-traffic kernel",
              "speed-up vs NumPy reference", "torch Adam fused GB/s (ours/torch)"]
    out = []
    for r in bench["rows"]:
        ref = r.get("vs_reference")
        torch = "-" if "torch_adam_gbps" not in r else (
            f"{fmt(r['torch_adam_gbps'])} ({r['gbps_vs_torch']:.2f})")
        out.append([f"{r['n']:,}", r["dtype"], fmt(r["step_us"]), fmt(r["step_unchecked_us"]),
                    fmt(r["gbps"]), f"{r['vs_traffic']:.2f}x",
                    "-" if ref is None else f"{ref:.1f}x", torch])
    return table(header, out)


def targets_nodes(bench, mpi):
    rows = []
    by = {(r["n"], r["dtype"]): r for r in bench["rows"]}
    big = max(r["n"] for r in bench["rows"])
    if (big, "float32") in by:
        v = by[(big, "float32")]["vs_traffic"]
        other = by.get((big, "float64"))
        extra = "" if other is None else f" ({big:,} float64: {other['vs_traffic']:.2f}x)"
        rows.append([f"{big:,} float32 within 1.15x of the same-traffic kernel",
                     f"{v:.2f}x{extra}", verdict(v <= 1.15)])
    if "check_finite_ratio" in bench:
        c = bench["check_finite_ratio"]
        rows.append(["check_finite at most 1.2x (at the largest N)",
                     ", ".join(f"{k} {v:.2f}x" for k, v in c.items()),
                     verdict(all(v <= 1.2 for v in c.values()))])
    if "many_small" in bench:
        m = bench["many_small"]
        rows.append([f"{m['arrays']} arrays of {m['size']:,} at most 1.1x one array of "
                     f"{m['arrays'] * m['size']:,}",
                     f"{m['ratio']:.2f}x (same gradient arrays), {m['ratio_new']:.2f}x "
                     "(new arrays each step)", verdict(m["ratio"] <= 1.1)])
    for row in bench.get("small_lists", ()):
        if "float32" in row["case"]:
            continue                # two dtypes: among the other rows
        rows.append([f"{row['case']}, 20x the NumPy reference",
                     f"{row['step_us']:.2f} µs, {row['speedup']:.1f}x",
                     verdict(row["speedup"] >= 20)])
    if bench.get("model_shapes"):
        ms = bench["model_shapes"]
        rows.append(["model-shaped lists, bytes/s at least fused Adam's",
                     "; ".join(f"{r['case']} {r['bytes_per_s_vs_adam']:.2f}x "
                               f"(dense gradients {r['dense_bytes_per_s_vs_adam']:.2f}x)"
                               for r in ms),
                     verdict(all(r["bytes_per_s_vs_adam"] >= 1 for r in ms))])
    bare_rows = [r for r in bench.get("model_shapes", ())
                 if "dense_unchecked_time_vs_adam" in r]
    if bare_rows:
        rows.append(["stretch: dense gradients (counts not moved, Adam's 28 B), time at most "
                     "fused Adam's (check_finite=False, as Adam does not check)",
                     "; ".join(f"{r['case']} {r['dense_unchecked_time_vs_adam']:.2f}x"
                               for r in bare_rows),
                     verdict(all(r["dense_unchecked_time_vs_adam"] <= 1 for r in bare_rows))])
    if "minimize" in bench:
        m = bench["minimize"]
        rows.append([f"minimize on {m['dim']}-D Rosenbrock, an iteration at most 1.25x "
                     "fun+jac", f"{m['iteration_us']:.1f} µs against {m['fun_jac_us']:.1f} µs: "
                     f"{m['ratio']:.2f}x", verdict(m["ratio"] <= 1.25)])
    pt = {r["case"]: r for r in bench.get("pytorch", ())}
    big_cases = [c for c in pt if c != "one 10-element parameter"]
    if big_cases and all("speedup_vs_original" in pt[c] for c in big_cases):
        rows.append([f"PyTorch front end, 10x the original on {' and '.join(big_cases)}",
                     ", ".join(f"{pt[c]['speedup_vs_original']:.1f}x" for c in big_cases),
                     verdict(all(pt[c]["speedup_vs_original"] >= 10 for c in big_cases))])
        if all("unchecked_speedup_vs_original" in pt[c] for c in big_cases):
            rows.append(["the same with check_finite=False",
                         ", ".join(f"{pt[c]['unchecked_speedup_vs_original']:.1f}x (the "
                                   f"original took {pt[c]['original_vs_adam']:.1f}x fused "
                                   "Adam's time)" for c in big_cases),
                         verdict(all(pt[c]["unchecked_speedup_vs_original"] >= 10
                                     for c in big_cases))])
    if big_cases:
        rows.append(["PyTorch front end, bytes/s at least fused Adam's",
                     ", ".join(f"{pt[c]['bytes_per_s_vs_adam']:.2f}x" for c in big_cases),
                     verdict(all(pt[c]["bytes_per_s_vs_adam"] >= 1 for c in big_cases))])
    one = pt.get("one 10-element parameter")
    if one and "speedup_vs_original" in one:
        rows.append(["PyTorch front end, one 10-element parameter 5x the original",
                     f"{one['ours_us']:.1f} µs against {one['original_us']:.1f} µs: "
                     f"{one['speedup_vs_original']:.1f}x",
                     verdict(one["speedup_vs_original"] >= 5)])
    if "sparse" in bench:
        s = bench["sparse"]
        rows.append(["row-sparse step 50x the dense step (beta=0 and lazy)",
                     f"beta=0 {s['beta0_speedup']:.0f}x, lazy {s['lazy_speedup']:.0f}x",
                     verdict(min(s["beta0_speedup"], s["lazy_speedup"]) >= 50)])
    if "startup" in bench:
        s = bench["startup"]
        rows.append(["fresh process, import and first step at most 1.4x 'import numpy, numba'",
                     f"{s['ratio']:.2f}x; kernels compiled: {s['compiled_in_fresh_process']}",
                     verdict(s["ratio"] <= 1.4)])
    if "cold" in bench:
        c = bench["cold"]
        figure = (f"{c['first_small_step_s']:.3f} s + {c['first_parallel_step_s']:.3f} s "
                  f"against {c['plain_serial_s']:.2f} s + {c['plain_parallel_s']:.2f} s: "
                  f"{c['ratio']:.2f}x")
        if "wait" in c:
            w = c["wait"]
            figure += (f" (the steps taken by the reference while a child process "
                       f"compiles; both kernels in use after {c['compiled_after_s']:.1f} s. "
                       f"Compiling in the process instead: {w['ratio']:.1f}x)")
        rows.append(["cold cache, first small + first parallel step, at most 5x a plain "
                     "@njit loop", figure, verdict(c["ratio"] <= 5)])
    if mpi is not None:
        r = mpi["mpi"]
        rows.append([f"MPI sharded step at most 1.2x one process stepping its shard "
                     f"({r['ranks']} ranks)", f"{r['overhead_vs_shard_step']:.1f}x",
                     verdict(r["overhead_vs_shard_step"] <= 1.2)])
        rows.append(["MPI state per rank at most 0.5 of the replicated state",
                     f"{r['state_fraction']:.2f}", verdict(r["state_fraction"] <= 0.5)])
    return table(["target", "this run", ""], rows)


def extras_nodes(bench):
    items = []
    for row in bench.get("small_lists", ()):
        if "float32" in row["case"]:
            items.append(f"step() on {row['case']} (one compiled call for both dtypes): "
                         f"{row['step_us']:.2f} µs, {row['speedup']:.1f}x the NumPy "
                         "reference stepping the same arrays")
    for u in bench.get("uniform", ()):
        items.append(f"gradients without exact zeros (the division-free uniform-count loop), "
                     f"{u['n']:,} {u['dtype']}, unchecked: {u['no_zeros_us']:,.1f} µs against "
                     f"{u['zeros_us']:,.1f} µs with zeros ({u['ratio']:.2f}x)")
    if "cold" in bench:
        c = bench["cold"]
        item = (f"empty compile cache: first small float32 step "
                f"{c['first_small_step_s']:.3f} s, "
                f"first parallel-size step {c['first_parallel_step_s']:.3f} s (against "
                f"{c['plain_serial_s']:.2f} s + {c['plain_parallel_s']:.2f} s to compile a "
                "plain @njit loop of the same update)")
        if "wait" in c:
            w = c["wait"]
            item += (f"; both kernels compiled by a child process and in use after "
                     f"{c['compiled_after_s']:.1f} s; with EXPECTIGRAD_NP_COMPILE=wait "
                     f"(compiled in the process) {w['first_small_step_s']:.1f} s and "
                     f"{w['first_parallel_step_s']:.1f} s")
        items.append(item)
    if "startup" in bench:
        s = bench["startup"]
        items.append(f"fresh process with a warm cache, import and first step: "
                     f"{s['import_step_ms']:.0f} ms against {s['import_numpy_numba_ms']:.0f} ms "
                     f"for 'import numpy, numba'; kernels compiled there: "
                     f"{s['compiled_in_fresh_process']}; heavy modules imported: "
                     f"{', '.join(s['heavy_modules_imported']) or 'none'}")
    spec = bench.get("specialisations", {})
    if spec:
        items.append("kernels compiled during the run: " + "; ".join(
            f"{k} [{', '.join(v)}]" for k, v in spec.items() if v))
    items.append(f"parallel kernels from {bench['parallel_min_size']:,} elements, "
                 f"{bench['machine']['threads']} threads")
    return bullets(items)


def sparse_nodes(bench):
    s = bench["sparse"]
    return para(f"{s['touched']} random rows of a {s['rows']:,} x {s['width']} float32 "
                "table a step:") + table(["step", "time", "vs the dense step"], [
        ["dense, beta=0.9", f"{s['dense_us']:,.0f} µs", "1x"],
        ["row-sparse, beta=0", f"{s['beta0_us']:,.0f} µs", f"{s['beta0_speedup']:.0f}x"],
        ["row-sparse, beta=0.9, lazy=True", f"{s['lazy_us']:,.0f} µs",
         f"{s['lazy_speedup']:.0f}x"],
        ["row-sparse, beta=0.9, eager", f"{s['eager_us']:,.0f} µs",
         f"{s['eager_speedup']:.1f}x"],
    ])


def pytorch_nodes(bench):
    rows = []
    for r in bench.get("pytorch", ()):
        orig = r.get("original_us")
        bare = r.get("unchecked_us")
        rows.append([r["case"], f"{r['elements']:,}", f"{fmt(r['ours_us'])} µs",
                     "-" if bare is None else f"{fmt(bare)} µs",
                     "-" if orig is None else f"{fmt(orig)} µs", f"{fmt(r['adam_us'])} µs",
                     "-" if orig is None else f"{r['speedup_vs_original']:.1f}x faster",
                     "-" if orig is None or bare is None
                     else f"{r['unchecked_speedup_vs_original']:.1f}x faster",
                     f"{r['bytes_per_s_vs_adam']:.2f}x",
                     "-" if bare is None else f"{r['unchecked_time_vs_adam']:.2f}x"])
    return table(["parameters", "float32 elements", "ours", "ours, check_finite=False",
                  "original", "fused Adam", "ours vs original",
                  "check_finite=False vs original", "bytes/s vs fused Adam",
                  "check_finite=False, time vs fused Adam"], rows)


def models_nodes(bench):
    rows = [[r["case"], str(r["arrays"]), f"{r['elements']:,}", f"{fmt(r['step_us'])} µs",
             f"{fmt(r['torch_adam_us'])} µs", f"{r['bytes_per_s_vs_adam']:.2f}x",
             f"{fmt(r['dense_step_us'])} µs", f"{r['dense_bytes_per_s_vs_adam']:.2f}x",
             "-" if "dense_unchecked_us" not in r else f"{fmt(r['dense_unchecked_us'])} µs",
             "-" if "dense_unchecked_us" not in r
             else f"{r['dense_unchecked_time_vs_adam']:.2f}x"]
            for r in bench.get("model_shapes", ())]
    return table(["list", "arrays", "float32 elements", "step", "fused Adam",
                  "bytes/s vs Adam", "step, dense gradients", "bytes/s vs Adam",
                  "dense, check_finite=False", "its time vs Adam"], rows)


def mpi_nodes(mpi):
    if mpi is None:
        return para("No MPI run is recorded (docs/_data/bench_mpi.json).")
    rows = [mpi[k] for k in ("mpi", "mpi_one_rank_a_core") if k in mpi]
    return table(["ranks", "float32 elements", "sharded step", "its collectives alone",
                  "one process stepping a shard", "overhead vs the shard step",
                  "replicated step", "state per rank (of replicated)"],
                 [[str(r["ranks"]), f"{r['elements']:,}", f"{fmt(r['step_us'])} µs",
                   f"{fmt(r['collectives_us'])} µs", f"{fmt(r['shard_step_us'])} µs",
                   f"{r['overhead_vs_shard_step']:.1f}x",
                   f"{fmt(r['replicated_step_us'])} µs", f"{r['state_fraction']:.2f}"]
                  for r in rows])


def pieces_nodes(pieces):
    if pieces is None:
        return para("No run of bench --pieces is recorded (docs/_data/bench_pieces.json).")
    rows = []
    for r in pieces["pieces"]:
        unit, scale = ("s", 1e-6) if r["with_us"] > 1e5 else ("µs", 1.0)
        rows.append([r["piece"], r["where"], r["case"], f"{r['with_us'] * scale:,.2f} {unit}",
                     f"{r['without_us'] * scale:,.2f} {unit}", f"{r['buys']:.2f}x"])
    return table(["piece", "where", "case", "with it", "without it", "without / with"],
                 rows)


class BenchDirective(Directive):
    """``.. bench:: PART``: a part of the recorded benchmark."""

    required_arguments = 1
    has_content = False

    def run(self):
        part = self.arguments[0]
        bench, mpi, info = load("bench.json"), load("bench_mpi.json"), load("machine.json")
        if bench is None:
            raise self.error("docs/_data/bench.json is missing: run docs/_data/record.py")
        render = {
            "machine": lambda: machine_nodes(bench, info),
            "rows": lambda: rows_nodes(bench),
            "targets": lambda: targets_nodes(bench, mpi),
            "extras": lambda: extras_nodes(bench),
            "sparse": lambda: sparse_nodes(bench),
            "pytorch": lambda: pytorch_nodes(bench),
            "models": lambda: models_nodes(bench),
            "mpi": lambda: mpi_nodes(mpi),
            "pieces": lambda: pieces_nodes(load("bench_pieces.json")),
        }
        if part not in render:
            raise self.error(f"bench: unknown part {part!r}; one of {', '.join(render)}")
        return render[part]()


def undecorate_mocks(app, what, name, obj, options, lines):
    """A class decorated by a mocked framework's decorator (Keras's
    ``register_keras_serializable``) is a mock in its module until undone:
    put the class back before autodoc lists and documents its members."""
    if what != "module":
        return
    from sphinx.ext.autodoc.mock import ismock, undecorate
    for key, value in list(vars(obj).items()):
        if ismock(value) and getattr(value, "__sphinx_decorator_args__", None):
            setattr(obj, key, undecorate(value))


def setup(app):
    app.connect("builder-inited", lambda app: render_figures(app))
    app.connect("autodoc-process-docstring", undecorate_mocks)
    app.add_directive("bench", BenchDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
