"""Checkpoints: atomic writes, bit-identical resume, and refusal of bad files."""
import json
import os
import zipfile

import numpy as np
import pytest

import expectigrad_np as eg
from expectigrad_np import checkpoint, schedules

BACKENDS = ["cpu", "numpy"]


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((4, 3)).astype(np.float32),
            rng.standard_normal(5),
            rng.standard_normal((2, 2, 2)).astype(np.float32),
            rng.standard_normal(3)]


def make_opt(params, backend="cpu", lr=None, **kw):
    lr = schedules.cosine_decay(0.05, 40) if lr is None else lr
    groups = [{"params": params[:2], "lr": lr},
              {"params": params[2:], "beta": 0.0, "sparse_counter": False,
               "clipvalue": 0.7}]
    return eg.Expectigrad(groups, lr=0.01, backend=backend, global_clipnorm=5.0, **kw)


def grads_for(params, rng):
    out = []
    for p in params:
        g = rng.standard_normal(p.shape).astype(p.dtype)
        g[rng.random(p.shape) < 0.3] = 0   # exercise the sparse counter
        out.append(g)
    return out


def snapshot(opt):
    sd = opt.state_dict()
    return ([p.copy() for p in opt.params], sd["step"],
            {i: {k: np.array(v) for k, v in e.items()} for i, e in sd["state"].items()},
            repr(sd["param_groups"]))


def assert_same(a, b):
    params_a, step_a, state_a, groups_a = a
    params_b, step_b, state_b, groups_b = b
    assert step_a == step_b and groups_a == groups_b
    for x, y in zip(params_a, params_b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys()
        for k in state_a[i]:
            assert state_a[i][k].dtype == state_b[i][k].dtype
            np.testing.assert_array_equal(state_a[i][k], state_b[i][k])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bit_identical(tmp_path, backend):
    rng = np.random.default_rng(1)
    stream = [grads_for(make_params(), rng) for _ in range(30)]
    stream[5][1] = None                      # arrays that skip steps keep own t
    stream[17][2] = None

    ref_params = make_params()
    ref = make_opt(ref_params, backend)
    for g in stream:
        ref.step(g)

    a_params = make_params()
    a = make_opt(a_params, backend)
    for g in stream[:12]:
        a.step(g)
    path = tmp_path / "ckpt.npz"
    a.save(path)
    del a

    b_params = make_params(seed=99)          # fresh, different values
    b = make_opt(b_params, backend)
    b.load(path)
    for g in stream[12:]:
        b.step(g)
    assert_same(snapshot(b), snapshot(ref))


def test_params_false_restores_only_the_optimizer(tmp_path):
    params = make_params()
    a = make_opt(params)
    a.step(grads_for(params, np.random.default_rng(0)))
    a.save(tmp_path / "c", params=False)
    fresh = make_params(seed=5)
    kept = [p.copy() for p in fresh]
    b = make_opt(fresh)
    b.load(tmp_path / "c")
    for p, q in zip(fresh, kept):
        np.testing.assert_array_equal(p, q)
    assert b.state_dict()["step"] == 1
    np.testing.assert_array_equal(b.state_dict()["state"][0]["mean_sq"],
                                  a.state_dict()["state"][0]["mean_sq"])


def test_file_is_a_plain_versioned_npz(tmp_path):
    params = make_params()
    opt = make_opt(params)
    opt.step(grads_for(params, np.random.default_rng(0)))
    path = tmp_path / "exact_name.ckpt"
    opt.save(path)
    assert sorted(os.listdir(tmp_path)) == ["exact_name.ckpt"]   # no suffix, no temp
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
        meta = json.loads(str(z["meta"]))
    assert meta["format"] == checkpoint.FORMAT
    assert meta["version"] == checkpoint.FORMAT_VERSION == 1
    assert meta["step"] == 1
    assert meta["groups"][0]["lr"] == {"schedule": repr(schedules.cosine_decay(0.05, 40))}
    assert meta["groups"][1]["lr"] == 0.01


# --- atomic writes ---------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A checkpoint on disk, its bytes, and the optimizer that wrote it (stepped
    once more since, so that a new save would write different bytes)."""
    params = make_params()
    opt = make_opt(params)
    rng = np.random.default_rng(3)
    opt.step(grads_for(params, rng))
    path = tmp_path / "ckpt.npz"
    opt.save(path)
    opt.step(grads_for(params, rng))
    return path, path.read_bytes(), opt


def _fail(*args, **kwargs):
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("target", ["os.replace", "os.fsync", "numpy.savez"])
def test_interrupted_save_leaves_old_file(saved, monkeypatch, target):
    path, before, opt = saved
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(__import__(module), name, _fail)
    with pytest.raises(OSError, match="simulated"):
        opt.save(path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]      # temporary file removed


def test_save_killed_midway_through_the_write(saved, monkeypatch):
    """The process dies after half the archive is written (an exception that
    is not an Exception stands in for the kill)."""
    path, before, opt = saved
    real_savez = np.savez

    def half_then_die(f, **arrays):
        real_savez(f, **arrays)
        f.seek(0)
        f.truncate(f.tell() // 2 + 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        opt.save(path)
    assert path.read_bytes() == before
    other = make_opt(make_params())
    other.load(path)                                     # still loadable


def test_save_replaces_old_file_when_it_succeeds(saved):
    path, before, opt = saved
    opt.save(path)
    assert path.read_bytes() != before
    fresh = make_opt(make_params(seed=4))
    fresh.load(path)
    assert_same(snapshot(fresh), snapshot(opt))


# --- refusals ---------------------------------------------------------------------

def refused(opt, path, match):
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match) as info:
        opt.load(path)
    assert str(path) in str(info.value)
    assert_same(snapshot(opt), before)


def stepped_target():
    """An optimizer with nonzero state, to show that a refusal changes nothing."""
    params = make_params(seed=7)
    opt = make_opt(params)
    opt.step(grads_for(params, np.random.default_rng(8)))
    return opt


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file_is_refused(saved, fraction):
    path, data, _ = saved
    path.write_bytes(data[:int(len(data) * fraction)])
    refused(stepped_target(), path, "truncated or corrupt")


def test_corrupt_bytes_are_refused(saved):
    path, data, _ = saved
    # Flip a byte in each stored array's header and data, and in the zip directory.
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    spots = []
    for info in infos:   # the last data byte of every member
        h = info.header_offset
        name_len = int.from_bytes(data[h + 26:h + 28], "little")
        extra_len = int.from_bytes(data[h + 28:h + 30], "little")
        start = h + 30 + name_len + extra_len
        spots += [start + 20, start + info.compress_size - 1]   # npy header, data
    spots.append(len(data) - 10)                                # zip directory
    assert len(spots) > 10
    for spot in spots:
        bad = bytearray(data)
        bad[spot] ^= 0x55
        path.write_bytes(bytes(bad))
        refused(stepped_target(), path, "cannot load checkpoint")


def test_not_a_checkpoint_is_refused(tmp_path):
    cases = {"empty.npz": b"", "text.npz": b"hello world\n" * 10}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        refused(stepped_target(), tmp_path / name, "cannot load checkpoint")
    np.save(tmp_path / "one.npy", np.zeros(3))
    refused(stepped_target(), tmp_path / "one.npy", "single .npy")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    refused(stepped_target(), tmp_path / "other.npz", "not an Expectigrad checkpoint")
    with pytest.raises(FileNotFoundError):
        stepped_target().load(tmp_path / "missing.npz")


def rewrite(path, edit_meta=None, edit_arrays=None):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(version=2), "format version 2"),
    (lambda m: m.update(format="other"), "wrong format name"),
    (lambda m: m.update(step=-1), "bad step count"),
    (lambda m: m["arrays"][1].update(step=10**6), "bad step count"),
    (lambda m: m["groups"][1].update(eps=1e-7), "eps=1e-07"),
    (lambda m: m["groups"][1].update(lr=0.02), "lr=0.02"),
    (lambda m: m["groups"][1].update(clipvalue=None), "clipvalue=None"),
    (lambda m: m["groups"][0].update(sparse_counter=False), "sparse_counter=False"),
    (lambda m: m.update(global_clipnorm=None), "global_clipnorm=None"),
])
def test_mismatched_meta_is_refused(saved, edit, match):
    path, _, _ = saved
    rewrite(path, edit_meta=edit)
    refused(stepped_target(), path, match)


@pytest.mark.parametrize("edit, match", [
    (lambda a: a.pop("state_2_mean_sq"), "'state_2_mean_sq'.*missing"),
    (lambda a: a.pop("state_0_count"), "'state_0_count'.*missing"),
    (lambda a: a.pop("param_3"), "'param_3'.*missing"),
    (lambda a: a.update(state_1_mean_sq=a["state_1_mean_sq"].astype(np.float32)),
     "dtype float32, expected .* float64"),
    (lambda a: a.update(state_0_count=a["state_0_count"].astype(np.int64)),
     "dtype int64, expected .* uint32"),
    (lambda a: a.update(state_0_momentum=a["state_0_momentum"][:2]), "shape \\(2, 3\\)"),
    # Momentum for an array whose beta is 0 now is loaded (it is kept once
    # beta was > 0); of the wrong dtype it is refused.
    (lambda a: a.update(state_2_momentum=np.zeros((2, 2, 2), np.int64)),
     "state_2_momentum.*dtype int64"),
    (lambda a: a["state_1_mean_sq"].__setitem__(0, np.nan), "NaN or infinity"),
    (lambda a: a["state_3_mean_sq"].__setitem__(0, -1.0), "negative"),
])
def test_bad_arrays_are_refused(saved, edit, match):
    path, _, _ = saved
    rewrite(path, edit_arrays=edit)
    refused(stepped_target(), path, match)


def test_mismatched_optimizer_is_refused(saved):
    path, _, _ = saved
    p = make_params()
    cases = [
        (eg.Expectigrad(p, lr=0.01), "2 param groups, the optimizer has 1"),
        (make_opt([p[0], p[1], p[2]]), "2 parameters in the file, 1 in the optimizer"),
        (make_opt([p[0], p[1], p[2], np.zeros(4)]), r"shape \(3,\) in the file, \(4,\)"),
        (make_opt([p[0], p[1], p[2], p[3].astype(np.float32)]), "dtype <f8 in the file"),
        (make_opt(p, lr=schedules.cosine_decay(0.05, 41)), "cosine_decay"),
        (make_opt(p, lr=0.05), "cosine_decay"),
        (make_opt(p, lr=lambda step: 0.05), "cosine_decay"),
        (eg.Expectigrad([{"params": p[:2], "lr": schedules.cosine_decay(0.05, 40)},
                         {"params": p[2:], "beta": 0.0, "sparse_counter": False,
                          "clipvalue": 0.7}], lr=0.01), "global_clipnorm"),  # not 5.0
    ]
    for opt, match in cases:
        refused(opt, path, match)


def test_callable_lr_rule(tmp_path):
    """A non-schedule callable is recorded as 'a callable': it loads into an
    optimizer whose lr is any callable, and is refused for a number."""
    path = tmp_path / "c.npz"
    a = make_opt(make_params(), lr=lambda step: 0.05 / (1 + step))
    a.step(grads_for(a.params, np.random.default_rng(0)))
    a.save(path)
    with np.load(path) as z:
        assert json.loads(str(z["meta"]))["groups"][0]["lr"] == {
            "callable": "test_callable_lr_rule.<locals>.<lambda>"}
    make_opt(make_params(), lr=lambda step: 0.05 / (1 + step)).load(path)
    refused(make_opt(make_params(), lr=0.05), path, "callable lr")
    refused(make_opt(make_params()), path, "callable lr")   # a schedule is not it


def test_numbers_compare_by_value(tmp_path):
    path = tmp_path / "c.npz"
    a = eg.Expectigrad([np.zeros(3)], lr=0.1, eps=1e-8)
    a.step([np.ones(3)])
    a.save(path)
    eg.Expectigrad([np.zeros(3)], lr=np.float64(0.1), eps=1e-8).load(path)
    refused(eg.Expectigrad([np.zeros(3)], lr=0.1 + 1e-17 + 1e-16, eps=1e-8), path, "lr")


def test_cross_backend_load(tmp_path):
    params = make_params()
    a = make_opt(params, "cpu")
    a.step(grads_for(params, np.random.default_rng(0)))
    a.save(tmp_path / "c.npz")
    b = make_opt(make_params(seed=3), "numpy")
    b.load(tmp_path / "c.npz")
    assert_same(snapshot(a), snapshot(b))


# --- every field of the meta record, damaged ------------------------------------------

def _paths(node, path=()):
    """Paths to every value (leaves and containers) of a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))
    if path:
        yield path


DAMAGE = [5, -1, 0, 1.5, True, None, "x", [1], {"a": 1}]


def test_damaged_meta_is_loaded_or_refused_cleanly(tmp_path):
    """Each field of the meta record replaced by each of a few wrong values:
    the load either succeeds (the change was harmless, like 3 -> 3.0) or
    raises ValueError naming the file; nothing else escapes and a refusal
    changes nothing."""
    params = make_params()
    a = make_opt(params)
    a.step(grads_for(params, np.random.default_rng(0)))
    clean = tmp_path / "clean.npz"
    a.save(clean)
    with np.load(clean) as z:
        meta = json.loads(str(z["meta"]))
    target = stepped_target()
    before = snapshot(target)
    path = tmp_path / "damaged.npz"
    refusals = 0
    for where in _paths(meta):
        for value in DAMAGE:
            def edit(m):
                node = m
                for key in where[:-1]:
                    node = node[key]
                node[where[-1]] = value
            path.write_bytes(clean.read_bytes())
            rewrite(path, edit_meta=edit)
            try:
                target.load(path)
            except ValueError as exc:
                assert str(path) in str(exc)
                assert_same(snapshot(target), before)
                refusals += 1
            else:                                  # harmless: put the state back
                target = stepped_target()
    assert refusals > 0.9 * len(list(_paths(meta))) * len(DAMAGE)


_WARMUP_OF_A_FUNCTION = """
import sys, numpy as np, expectigrad_np as eg
from expectigrad_np import schedules
def decay(step):
    return 1e-3 / (1 + step)
x = np.ones(3)
opt = eg.Expectigrad([x], lr=schedules.warmup(decay, steps=10))
if sys.argv[1] == "save":
    opt.step([np.ones(3)])
    opt.save(sys.argv[2])
else:
    opt.load(sys.argv[2])
    assert opt.step_count == 1
print("ok")
"""


def test_a_warmup_of_a_function_loads_in_another_process(tmp_path):
    # Its repr names the function by its address: it is recorded as a
    # callable, as the function alone would be.
    import subprocess
    import sys
    path = str(tmp_path / "ckpt.npz")
    for mode in ("save", "load"):
        out = subprocess.run([sys.executable, "-c", _WARMUP_OF_A_FUNCTION, mode, path],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    opt = eg.Expectigrad([np.ones(3)], lr=schedules.warmup(schedules.constant(1e-3), 10))
    with pytest.raises(ValueError, match="callable lr"):
        opt.load(path)                  # a schedule where the file has a callable
