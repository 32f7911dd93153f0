"""The PyTorch front end against the original project's optimizer
(tests/torch_original.py, transcribed from its source): the same numbers in
float64, torch's conventions (groups, closures, schedulers, GradScaler,
state dicts), and clear errors for what it does not take."""
import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed "
                            "(pip install 'expectigrad_np[torch]')")

from torch_original import OriginalExpectigrad  # noqa: E402

from expectigrad_np.pytorch import Expectigrad  # noqa: E402


def _params(seed=0, dtype=torch.float64, shapes=((4, 3), (3,), (2, 2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _grads(ps, rng, none_p=0.0, zero_p=0.3):
    out = []
    for p in ps:
        if rng.random() < none_p:
            out.append(None)
            continue
        a = rng.standard_normal(tuple(p.shape)) * (rng.random(tuple(p.shape)) >= zero_p)
        out.append(torch.tensor(a, dtype=p.dtype))
    return out


def _feed(a, b, rng):
    """The same new gradients (with exact zeros) on both parameter lists."""
    for pa, pb, g in zip(a, b, _grads(a, rng)):
        pa.grad, pb.grad = g.clone(), g.clone()


def _run_both(hyper, steps=30, none_p=0.2, seed=0, groups=None):
    a, b = _params(seed), _params(seed)
    oa = Expectigrad(a if groups is None else groups(a), **hyper)
    ob = OriginalExpectigrad(b if groups is None else groups(b), **hyper)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        gs = _grads(a, rng, none_p)
        for pa, pb, g in zip(a, b, gs):
            pa.grad = None if g is None else g.clone()
            pb.grad = None if g is None else g.clone()
        oa.step()
        ob.step()
    return a, b, oa, ob


def _assert_close(a, b, rtol=1e-10):
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.detach().numpy(), y.detach().numpy(), rtol=rtol,
                                   atol=1e-14)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("sparse_counter", [True, False])
@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_the_original_trajectory_in_float64(beta, sparse_counter, eps):
    """Exact zeros, None gradients (skipped, step not advanced), all paths."""
    a, b, _, _ = _run_both(dict(lr=0.05, beta=beta, eps=eps, sparse_counter=sparse_counter))
    _assert_close(a, b)


def test_param_groups_with_their_own_lr_and_eps():
    groups = lambda ps: [{"params": ps[:1], "lr": 0.1, "eps": 1e-4},  # noqa: E731
                         {"params": ps[1:]}]
    a, b, _, _ = _run_both(dict(lr=0.02), groups=groups)
    _assert_close(a, b)


def test_per_group_beta_and_counter_are_honoured_unlike_the_original():
    """The documented difference: the original takes momentum and counter from
    the constructor for every group; here each group's own values count,
    as a separate optimizer per group would."""
    a = _params(1)
    b = _params(1)
    opt = Expectigrad([{"params": a[:1], "beta": 0.0, "sparse_counter": False},
                       {"params": a[1:]}], lr=0.05, beta=0.9)
    ob1 = OriginalExpectigrad(b[:1], lr=0.05, beta=0.0, sparse_counter=False)
    ob2 = OriginalExpectigrad(b[1:], lr=0.05, beta=0.9)
    rng = np.random.default_rng(1)
    for _ in range(10):
        _feed(a, b, rng)
        opt.step()
        ob1.step()
        ob2.step()
    _assert_close(a, b)


def test_closure_loss_and_zero_grad():
    p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = Expectigrad([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() == 5.0
    assert p.grad is not None
    opt.zero_grad()
    assert p.grad is None
    assert opt.step() is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=0.0), "lr must be greater than 0 but got 0.0"),
    (dict(lr=-1.0), "lr must be greater than 0 but got -1.0"),
    (dict(beta=1.0), r"beta must be in \[0,1\) but got 1.0"),
    (dict(beta=-0.1), r"beta must be in \[0,1\) but got -0.1"),
    (dict(eps=0.0), "eps must be greater than 0 but got 0.0"),
])
def test_the_original_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Expectigrad(_params(), **kwargs)
    opt = Expectigrad(_params()[:1])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group(dict({"params": _params()[1:]}, **kwargs))
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex64,
                                   torch.int64])
def test_unsupported_dtypes_say_what_is_supported(dtype):
    p = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match="torch.float32 or torch.float64"):
        Expectigrad([p])


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_embedding_gradients_step_as_their_dense_form(lazy, dtype):
    """nn.Embedding(sparse=True) against the same table with dense gradients."""
    torch.manual_seed(0)
    sparse_emb = torch.nn.Embedding(50, 4, sparse=True).to(dtype)
    dense_emb = torch.nn.Embedding(50, 4).to(dtype)
    dense_emb.weight.data.copy_(sparse_emb.weight.data)
    opt_s = Expectigrad(sparse_emb.parameters(), lr=0.05, lazy=lazy)
    opt_d = Expectigrad(dense_emb.parameters(), lr=0.05)
    for _ in range(20):
        idx = torch.randint(0, 50, (7,))         # duplicates likely
        if lazy:
            opt_s.sync(sparse_emb.weight, idx)   # the rows this batch reads
        for emb, opt in ((sparse_emb, opt_s), (dense_emb, opt_d)):
            opt.zero_grad()
            (emb(idx) ** 2).sum().backward()
            opt.step()
    assert sparse_emb.weight.grad.is_sparse
    opt_s.sync()
    if lazy:
        torch.testing.assert_close(sparse_emb.weight, dense_emb.weight,
                                   rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)
    else:
        assert torch.equal(sparse_emb.weight, dense_emb.weight)


def test_a_lazy_optimizer_stays_lazy_in_a_deep_copy():
    """A copy of a ``lazy=True`` optimizer leaves the rows a sparse step
    does not touch where they are (an eager one moves them on with their
    momentum)."""
    emb = torch.nn.Embedding(6, 2, sparse=True).double()
    opt = Expectigrad(emb.parameters(), lr=0.1, lazy=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    for twin in (opt, copy.deepcopy(opt)):
        weight = twin.param_groups[0]["params"][0]
        before = weight.detach().clone()
        weight.grad = torch.sparse_coo_tensor([[5]], [[1.0, 1.0]], (6, 2),
                                              dtype=torch.float64)
        twin.step()
        assert torch.equal(weight.detach()[1:3], before[1:3])    # lagging rows
        assert not torch.equal(weight.detach()[5], before[5])


def test_a_sparse_coo_gradient_over_two_dimensions_steps_as_its_dense_form():
    a = torch.zeros(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(6, 5, dtype=torch.float64, requires_grad=True)
    opt_a, opt_b = Expectigrad([a], lr=0.1), Expectigrad([b], lr=0.1)
    g = torch.sparse_coo_tensor([[0, 3, 3, 5], [1, 2, 2, 4]], [1.0, -2.0, 0.5, 3.0],
                                (6, 5), dtype=torch.float64, check_invariants=True)
    for _ in range(3):
        a.grad, b.grad = g, g.to_dense()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


def test_a_non_finite_sparse_gradient_is_refused_and_changes_nothing():
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    opt = Expectigrad(emb.parameters())
    (emb(torch.tensor([1, 2])) * float("nan")).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="NaN or infinity"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)
    assert opt.state_dict()["state"] == {} or all(
        float(s["step"]) == 0 for s in opt.state_dict()["state"].values())


def test_check_finite_false_skips_the_check_as_torch_optimizers_do():
    """``check_finite=False``: finite steps give the checked optimizer's
    bits; a NaN gradient is not refused and reaches the parameter (as with
    torch's Adam), where the default refuses it and changes nothing.  The
    setting survives a deep copy; a non-bool is refused."""
    a, b = _params(3), _params(3)
    checked, unchecked = Expectigrad(a, lr=0.05), Expectigrad(b, lr=0.05, check_finite=False)
    for k in range(4):
        for p, q in zip(a, b):
            p.grad = torch.full_like(p, 0.5 - k) * (1 + torch.arange(p.numel()).reshape(p.shape))
            q.grad = p.grad.clone()
        checked.step()
        unchecked.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    for p, q in zip(a, b):
        p.grad[...] = float("nan")
        q.grad[...] = float("nan")
    before = [p.detach().clone() for p in a]
    with pytest.raises(FloatingPointError, match="NaN or infinity"):
        checked.step()
    assert all(torch.equal(p, q) for p, q in zip(a, before))
    twin = copy.deepcopy(unchecked)
    unchecked.step()
    assert all(torch.isnan(q).all() for q in b)
    twin.step()
    assert all(torch.isnan(q).all() for q in twin.param_groups[0]["params"])
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        Expectigrad(_params(1), check_finite=1)


def test_add_param_group_keeps_the_state_of_existing_parameters():
    a, b = _params(2), _params(2)
    oa = Expectigrad(a[:2], lr=0.05)
    ob = OriginalExpectigrad(b[:2], lr=0.05)
    rng = np.random.default_rng(2)
    for step in range(12):
        if step == 5:
            oa.add_param_group({"params": a[2:], "lr": 0.02})
            ob.add_param_group({"params": b[2:], "lr": 0.02})
        n = 2 if step < 5 else 3
        for pa, pb, g in zip(a[:n], b[:n], _grads(a[:n], rng)):
            pa.grad, pb.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    _assert_close(a, b)


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, total_steps=40,
                                                  cycle_momentum=False),
    lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
], ids=["step", "lambda", "cosine", "onecycle", "exponential"])
def test_lr_schedulers(make):
    a, b = _params(3), _params(3)
    oa, ob = Expectigrad(a, lr=0.05), OriginalExpectigrad(b, lr=0.05)
    sa, sb = make(oa), make(ob)
    rng = np.random.default_rng(3)
    for _ in range(25):
        _feed(a, b, rng)
        oa.step()
        ob.step()
        sa.step()
        sb.step()
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]
    _assert_close(a, b)


def test_grad_scaler_skips_steps_with_inf():
    p = torch.ones(4, requires_grad=True)
    opt = Expectigrad([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    scaler.scale((p * 3).sum()).backward()
    scaler.step(opt)
    scaler.update()
    moved = p.detach().clone()
    assert not torch.equal(moved, torch.ones(4))
    opt.zero_grad()
    scaler.scale((p * torch.tensor([1.0, float("inf"), 1.0, 1.0])).sum()).backward()
    scaler.step(opt)                                  # skipped: inf found
    scaler.update()
    assert torch.equal(p.detach(), moved)
    assert int(opt.state_dict()["state"][0]["step"]) == 1


def test_state_dict_round_trip_resumes_bit_identically_and_copies():
    a, _, oa, _ = _run_both(dict(lr=0.05), steps=7, none_p=0.0)
    sd = oa.state_dict()
    assert set(sd["state"][0]) == {"step", "mean_sq", "count", "momentum"}
    b = [p.detach().clone().requires_grad_() for p in a]
    ob = Expectigrad(b, lr=0.05)
    ob.load_state_dict(sd)
    for entry in sd["state"].values():                # the loaded state is a copy
        for key in ("mean_sq", "momentum"):
            entry[key].fill_(1e6)
    rng = np.random.default_rng(9)
    for _ in range(5):
        _feed(a, b, rng)
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_state_dict_survives_torch_save(tmp_path):
    a, _, oa, _ = _run_both(dict(lr=0.05), steps=3, none_p=0.0)
    torch.save(oa.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt")
    ob = Expectigrad([p.detach().clone().requires_grad_() for p in a], lr=0.05)
    ob.load_state_dict(sd)
    for k, entry in ob.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, oa.state_dict()["state"][k][key])


@pytest.mark.parametrize("sparse_counter", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_switching_from_the_original_mid_training(sparse_counter, beta):
    """Load the original optimizer's state dict (sum, float counter) and
    continue: the trajectory stays the original's to 1e-10."""
    hyper = dict(lr=0.05, beta=beta, sparse_counter=sparse_counter)
    a, b = _params(4), _params(4)
    oa, ob = OriginalExpectigrad(a, **hyper), OriginalExpectigrad(b, **hyper)
    rng = np.random.default_rng(4)

    def step_both(first, second):
        _feed(a, b, rng)
        first.step()
        second.step()

    for _ in range(6):
        step_both(oa, ob)
    ours = Expectigrad(a, **hyper)
    ours.load_state_dict(copy.deepcopy(oa.state_dict()))
    for _ in range(10):
        step_both(ours, ob)
    _assert_close(a, b)


def test_a_bad_state_dict_changes_nothing():
    a, _, oa, _ = _run_both(dict(lr=0.05), steps=3, none_p=0.0)
    before = oa.state_dict()
    bad = copy.deepcopy(before)
    bad["state"][1]["mean_sq"] = torch.full((5,), 1.0, dtype=torch.float64)   # wrong shape
    with pytest.raises(ValueError):
        oa.load_state_dict(bad)
    bad = copy.deepcopy(before)
    bad["state"][0]["mean_sq"][0, 0] = -1.0
    with pytest.raises(ValueError):
        oa.load_state_dict(bad)
    after = oa.state_dict()
    for k in before["state"]:
        for key in before["state"][k]:
            assert torch.equal(before["state"][k][key], after["state"][k][key])


def test_float32_tensors_are_updated_in_place_by_the_cpu_kernels():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    ptrs = [p.data_ptr() for p in model.parameters()]
    ref = copy.deepcopy(model).double()
    opt = Expectigrad(model.parameters(), lr=0.01)
    oref = OriginalExpectigrad(ref.parameters(), lr=0.01)
    x = torch.randn(32, 6)
    for _ in range(20):
        for m, o, xx in ((model, opt, x), (ref, oref, x.double())):
            o.zero_grad()
            m(xx).square().mean().backward()
            o.step()
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert opt._core.backend == "cpu"
    for p, q in zip(model.parameters(), ref.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-4,
                                   atol=1e-5)


def test_non_contiguous_parameters():
    base_a = torch.randn(4, 3, dtype=torch.float64)
    base_b = base_a.clone()
    a = [base_a.t().requires_grad_()]
    b = [base_b.t().requires_grad_()]
    assert not a[0].is_contiguous()
    oa, ob = Expectigrad(a, lr=0.1), OriginalExpectigrad(b, lr=0.1)
    rng = np.random.default_rng(5)
    for _ in range(6):
        g = torch.tensor(rng.standard_normal((3, 4)))
        a[0].grad, b[0].grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    _assert_close(a, b)


def test_weight_decay_and_maximize():
    """maximize equals the original on negated gradients; weight decay is
    AdamW's decoupled decay with the scheduled lr."""
    a, b = _params(6), _params(6)
    oa = Expectigrad(a, lr=0.05, maximize=True)
    ob = OriginalExpectigrad(b, lr=0.05)
    rng = np.random.default_rng(6)
    for _ in range(8):
        for pa, pb, g in zip(a, b, _grads(a, rng)):
            pa.grad, pb.grad = g.clone(), -g
        oa.step()
        ob.step()
    _assert_close(a, b)
    p = torch.full((3,), 2.0, dtype=torch.float64, requires_grad=True)
    opt = Expectigrad([p], lr=0.1, weight_decay=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    want = 2.0
    for _ in range(4):
        p.grad = torch.zeros(3, dtype=torch.float64)
        want *= 1 - opt.param_groups[0]["lr"] * 0.5
        opt.step()
        sched.step()
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-15)


def test_importing_the_package_does_not_import_torch():
    code = ("import sys, numpy as np, expectigrad_np as eg\n"
            "eg.Expectigrad(np.zeros(3)).step(np.ones(3))\n"
            "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_transcription_is_the_original_where_it_is_installed():
    """The fallback oracle agrees with the original package bit for bit."""
    import torch_original
    if torch_original.OriginalExpectigrad is torch_original.Transcription:
        pytest.skip("the original expectigrad package is not installed")
    for hyper in (dict(lr=0.05), dict(lr=0.05, beta=0.0, sparse_counter=False)):
        a, b = _params(7), _params(7)
        oa = torch_original.Transcription(a, **hyper)
        ob = torch_original.OriginalExpectigrad(b, **hyper)
        rng = np.random.default_rng(7)
        for _ in range(10):
            for pa, pb, g in zip(a, b, _grads(a, rng, none_p=0.2)):
                pa.grad, pb.grad = g, None if g is None else g.clone()
            oa.step()
            ob.step()
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_deepcopy_and_pickle_continue_identically():
    import pickle
    a, _, oa, _ = _run_both(dict(lr=0.05), steps=4, none_p=0.0)
    twin = copy.deepcopy(oa)
    b = [p for g in twin.param_groups for p in g["params"]]
    restored = pickle.loads(pickle.dumps(oa))
    c = [p for g in restored.param_groups for p in g["params"]]
    rng = np.random.default_rng(8)
    for _ in range(3):
        for pa, pb, pc, g in zip(a, b, c, _grads(a, rng)):
            pa.grad, pb.grad, pc.grad = g.clone(), g.clone(), g.clone()
        oa.step()
        twin.step()
        restored.step()
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)
        assert x.data_ptr() != y.data_ptr()


def test_step_hooks_and_the_profiler_still_apply():
    p = torch.ones(3, requires_grad=True)
    opt = Expectigrad([p], lr=0.1)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    p.grad = torch.ones(3)
    opt.step()
    assert calls == ["pre", "post"]
    h1.remove()
    h2.remove()
    opt.step()
    assert calls == ["pre", "post"]
    with torch.profiler.profile() as prof:
        opt.step()
    assert any("Optimizer.step#Expectigrad.step" in e.name for e in prof.events())
    assert int(opt.state_dict()["state"][0]["step"]) == 3


# --- parameters that change under the optimizer ----------------------------------


def _train_both(make, steps, grads_of, change=None, at=None):
    """Step ours and the original on copies of the same parameters; ``change``
    edits each optimizer's param groups (and parameters) before step ``at``."""
    runs = []
    for cls in (Expectigrad, OriginalExpectigrad):
        ps = make()
        opt = cls([{"params": ps[:2]}, {"params": ps[2:3], "lr": 0.05}], lr=0.1)
        for k in range(steps):
            if k == at:
                ps = change(opt, ps)
            for p, g in zip(ps, grads_of(k, ps)):
                p.grad = g
            opt.step()
        runs.append(ps)
    return runs


def _seeded_grads(k, ps):
    gen = torch.Generator().manual_seed(k)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ps]


def _three():
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_()
            for s in ((3,), (2, 2), (4,))]


def test_a_parameter_replaced_in_its_group_is_stepped_with_fresh_state():
    def replace(opt, ps):
        new = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
        opt.param_groups[0]["params"][1] = new
        return [ps[0], new, ps[2]]
    ours, original = _train_both(_three, 6, _seeded_grads, replace, at=3)
    for a, b in zip(ours, original):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_a_parameter_appended_to_an_earlier_group_leaves_the_others_state_alone():
    def append(opt, ps):
        new = torch.ones(5, dtype=torch.float64, requires_grad=True)
        opt.param_groups[0]["params"].append(new)
        return ps[:2] + [new] + ps[2:]
    ours, original = _train_both(_three, 6, _seeded_grads, append, at=3)
    for a, b in zip(ours, original):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_a_parameter_whose_shape_changed_is_refused_and_its_state_kept():
    model = torch.nn.Linear(3, 2).double()
    opt = Expectigrad(model.parameters(), lr=0.1)
    x = torch.randn(5, 3, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    before = {i: {k: v.clone() for k, v in e.items()}
              for i, e in opt.state_dict()["state"].items()}
    old = model.weight.data
    model.weight.data = torch.randn(4, 3, dtype=torch.float64)
    model.weight.grad = torch.randn(4, 3, dtype=torch.float64)
    model.bias.grad = torch.randn(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"changed shape from \(2, 3\) to \(4, 3\)"):
        opt.step()
    model.weight.data = old                  # given back: the run goes on
    model.weight.grad = torch.randn(2, 3, dtype=torch.float64)
    after = opt.state_dict()["state"]
    for i, entry in before.items():
        for k, v in entry.items():
            assert torch.equal(after[i][k], v), (i, k)
    opt.step()
    assert float(opt.state_dict()["state"][0]["step"]) == 4


def _stepped_once(seed):
    """Parameters and an optimizer that has taken one step of ones."""
    ps = _params(seed)
    opt = Expectigrad(ps, lr=0.1)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    return ps, opt


def test_sparse_counter_cannot_change_through_a_rebuild():
    ps, opt = _stepped_once(3)
    opt.param_groups[0]["sparse_counter"] = False
    opt.add_param_group({"params": [torch.zeros(2, dtype=torch.float64,
                                                requires_grad=True)]})
    with pytest.raises(ValueError, match="sparse_counter cannot change"):
        opt.step()
    opt.param_groups[0]["sparse_counter"] = True
    opt.step()
    assert "count" in opt.state_dict()["state"][0]


def test_gradients_that_require_grad_are_read():
    """backward(create_graph=True) leaves gradients that require grad (as
    gradient penalties do): stepped as the original steps them."""
    a, b = _params(4), _params(4)
    ours, original = Expectigrad(a, lr=0.1), OriginalExpectigrad(b, lr=0.1)
    for _ in range(3):
        for ps, opt in ((a, ours), (b, original)):
            opt.zero_grad()
            sum((p ** 3).sum() for p in ps).backward(create_graph=True)
            assert ps[0].grad.requires_grad
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=0)


def test_torch_state_dict_hooks_run_and_see_the_state():
    _, opt = _stepped_once(5)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd["state"])))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("post"))
    opt.load_state_dict(opt.state_dict())
    assert seen == [[0, 1, 2], "pre", "post"]


def test_sync_takes_a_parameter_or_its_index():
    emb = torch.nn.Embedding(6, 2, sparse=True).double()
    opt = Expectigrad(emb.parameters(), lr=0.1, lazy=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    opt.zero_grad()
    emb(torch.tensor([4])).sum().backward()
    opt.step()
    lagging = emb.weight.detach()[1].clone()
    opt.sync(0, torch.tensor([1]))
    assert not torch.equal(emb.weight.detach()[1], lagging)
    with pytest.raises(ValueError, match="has 1 parameters"):
        opt.sync(3)


def test_parameters_never_stepped_have_no_state_and_load_afresh():
    a, b = _params(1), _params(1)
    opt = Expectigrad(a, lr=0.1)
    a[1].grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [1]                 # as torch's optimizers keep it
    # Loaded into an optimizer that has stepped every parameter: the ones
    # without an entry start afresh (torch replaces the whole state).
    other = Expectigrad(b, lr=0.1)
    for p in b:
        p.grad = torch.full_like(p, 2.0)
    other.step()
    other.load_state_dict(sd)
    assert sorted(other.state_dict()["state"]) == [1]
    fresh = _params(1)
    with torch.no_grad():
        for p, q in zip(fresh, b):
            p.copy_(q)
    ref = Expectigrad(fresh, lr=0.1)
    ref.load_state_dict(sd)
    for ps, o in ((b, other), (fresh, ref)):
        for p in ps:
            p.grad = torch.full_like(p, -0.5)
        o.step()
    for p, q in zip(b, fresh):
        assert torch.equal(p, q)


@pytest.mark.parametrize("value, kind", [(float("nan"), ValueError), (-0.1, ValueError),
                                         ("0.1", TypeError)])
def test_a_bad_lr_written_into_a_group_is_named_as_such(value, kind):
    ps, opt = _stepped_once(3)
    before = [p.detach().clone() for p in ps]
    state = opt.state_dict()["state"]
    opt.param_groups[0]["lr"] = value
    with pytest.raises(kind, match=r"param_groups\[0\]\['lr'\]"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    assert all(torch.equal(state[i]["mean_sq"], e["mean_sq"])
               for i, e in opt.state_dict()["state"].items())


def test_a_sparse_gradient_with_no_sparse_dimension_steps_as_its_dense_form():
    a = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    opt_a, opt_b = Expectigrad([a], lr=0.1), Expectigrad([b], lr=0.1)
    dense = torch.tensor([[1.0, 0.0, -2.0], [0.5, 3.0, 0.0]], dtype=torch.float64)
    g = torch.sparse_coo_tensor(torch.zeros((0, 1), dtype=torch.long), dense[None],
                                (2, 3), check_invariants=True)
    assert g.sparse_dim() == 0
    for _ in range(3):
        a.grad, b.grad = g, dense
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


def test_a_parameter_laid_out_anew_in_its_memory_is_stepped_as_it_now_lies():
    # p.data = p.data.t() keeps the memory: the step must follow the new
    # layout, as it does for a transposed copy (state by position, as torch's).
    a = torch.arange(9, dtype=torch.float64).reshape(3, 3).requires_grad_()
    b = a.detach().clone().requires_grad_()
    opt_a, opt_b = Expectigrad([a], lr=0.1), Expectigrad([b], lr=0.1)
    g = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0], [5.0, 0.5, -2.0]], dtype=torch.float64)
    for p, o in ((a, opt_a), (b, opt_b)):
        p.grad = g.clone()
        o.step()
    a.data = a.data.t()
    b.data = b.data.t().contiguous()
    for _ in range(2):
        for p, o in ((a, opt_a), (b, opt_b)):
            p.grad = g.clone()
            o.step()
    assert torch.equal(a, b)


def test_a_state_dict_saved_at_lr_zero_or_with_a_tensor_lr_loads():
    # Schedulers reach lr = 0 (warm-up, PolynomialLR); lr may be a tensor.
    for lr in (0.0, torch.tensor(0.05)):
        ps, opt = _stepped_once(2)
        opt.param_groups[0]["lr"] = lr
        opt.step()
        sd = opt.state_dict()
        qs = [p.detach().clone().requires_grad_() for p in ps]
        other = Expectigrad(qs, lr=0.1)
        other.load_state_dict(sd)
        opt.load_state_dict(sd)
        for p, q in zip(ps, qs):
            p.grad = q.grad = torch.ones_like(p)
        opt.step()
        other.step()
        assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    _, opt = _stepped_once(2)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr is nan"):
        opt.load_state_dict(sd)


def test_the_state_is_true_once_stepped_so_checkpoint_tools_take_no_step():
    # torch.distributed.checkpoint takes an empty optimizer.state for one
    # never stepped, and steps it once with zero gradients to make it.
    ps = _params(3)
    opt = Expectigrad(ps, lr=0.1)
    assert not opt.state
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state and len(opt.state) == 0
    assert copy.deepcopy(opt).state
    fresh = Expectigrad([p.detach().clone() for p in ps], lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state
    try:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    except ImportError:
        return
    model = torch.nn.Linear(3, 2).double()
    opt = Expectigrad(model.parameters(), lr=0.1)
    model(torch.ones(4, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    opt.zero_grad()
    before = opt.state_dict()
    get_optimizer_state_dict(model, opt)
    after = opt.state_dict()
    assert all(torch.equal(before["state"][i][k], after["state"][i][k])
               for i in before["state"] for k in before["state"][i])


def test_a_parameter_cut_short_in_its_memory_is_refused_as_a_shape_change():
    ps, opt = _stepped_once(4)
    ps[0].data = ps[0].data[:2]              # the same memory and strides
    for p in ps:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="changed shape from"):
        opt.step()


def test_step_counts_past_2_to_the_24_survive_a_state_dict():
    ps, opt = _stepped_once(5)
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["step"] = torch.tensor(2.0 ** 24 + 1, dtype=torch.float64)
    opt.load_state_dict(sd)
    assert all(int(e["step"]) == 2 ** 24 + 1 for e in opt.state_dict()["state"].values())


def test_duplicate_sparse_rows_are_summed_as_torch_sums_them():
    # (1 + u) + u != 1 + (u + u) with u = 2**-53: the dense form's bits.
    u = 2.0 ** -53
    g = torch.sparse_coo_tensor(torch.tensor([[0, 1, 0, 0]]),
                                torch.tensor([[1.0], [3.0], [u], [u]], dtype=torch.float64),
                                (2, 1))
    a = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
    opt_a = Expectigrad([a], lr=1.0, beta=0.0, eps=1.0)
    opt_b = Expectigrad([b], lr=1.0, beta=0.0, eps=1.0)
    a.grad, b.grad = g, g.to_dense()
    opt_a.step()
    opt_b.step()
    assert torch.equal(a, b)


def test_a_parameter_taken_out_of_its_group_and_put_back_keeps_its_state():
    # As in torch's optimizers, whose state is keyed by the parameter.
    a, b = _params(6, shapes=((3,), (2,))), _params(6, shapes=((3,), (2,)))
    ours, original = Expectigrad(a, lr=0.1), OriginalExpectigrad(b, lr=0.1)
    for ps, opt in ((a, ours), (b, original)):
        for k in range(4):
            if k == 1:
                opt.param_groups[0]["params"] = [ps[1]]      # ps[0] out for a step
            if k == 2:
                opt.param_groups[0]["params"] = list(ps)     # and back
            for p in ps:
                p.grad = torch.full_like(p, 0.5 + k)
            opt.step()
    _assert_close(a, b)
    assert int(ours.state_dict()["state"][0]["step"]) == 3


def test_a_step_tells_autograd_the_parameters_changed():
    # As after any torch optimizer's step: a backward through a graph that
    # saved a stepped parameter fails instead of using its new values.
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    frozen = torch.tensor([1.0], requires_grad=True)      # no gradient: not stepped
    opt = Expectigrad([w, frozen], lr=0.1)
    x = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    loss = (w * x).sum()
    loss.backward(retain_graph=True)
    before = w._version, frozen._version
    opt.step()
    assert w._version > before[0] and frozen._version == before[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("make", [lambda: torch.zeros(3).expand(4, 3),
                                  lambda: torch.zeros(6).as_strided((2, 3), (0, 1))])
def test_a_parameter_whose_elements_share_memory_is_refused(make):
    with pytest.raises(ValueError, match="param group 0 param 0 has elements that share "
                                         r"memory .*p\.clone\(\)"):
        Expectigrad([make()])
    opt = Expectigrad([torch.zeros(3)])
    with pytest.raises(ValueError, match="param group 1 param 0 has elements that share"):
        opt.add_param_group({"params": [make()]})
    assert len(opt.param_groups) == 1


def test_a_parameter_listed_twice_in_a_group_is_refused_when_given():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match=r"param group 0 lists the same parameter twice "
                                         r"\(params 0 and 2\)"):
        with pytest.warns(UserWarning, match="duplicate parameters"):
            Expectigrad([p, torch.zeros(2), p])


def test_a_tensor_lr_is_taken_as_the_original_takes_it():
    a, b = _params(), _params()
    oa = Expectigrad(a[:2], lr=torch.tensor(0.1, dtype=torch.float64))
    oa.add_param_group({"params": a[2:], "lr": torch.tensor(0.05)})
    # The original given the tensors' values (with a float32 tensor it
    # computes its step size in float32).
    ob = OriginalExpectigrad(b[:2], lr=0.1)
    ob.add_param_group({"params": b[2:], "lr": torch.tensor(0.05).item()})
    rng = np.random.default_rng(3)
    for _ in range(5):
        _feed(a, b, rng)
        oa.step()
        ob.step()
    _assert_close(a, b)
    with pytest.raises(ValueError, match="lr must be greater than 0"):
        Expectigrad(_params(), lr=torch.tensor(0.0))


def test_a_state_dict_is_matched_to_the_parameters_by_its_groups_keys():
    # torch maps the saved groups' "params" keys to the parameters by
    # position (torch.distributed.checkpoint saves names there).
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = Expectigrad([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    renamed = copy.deepcopy(sd)
    renamed["param_groups"][0]["params"] = ["first", "second"]
    renamed["state"] = {"first": renamed["state"][0]}
    swapped = copy.deepcopy(sd)
    swapped["param_groups"][0]["params"] = [1, 0]
    swapped["state"] = {1: swapped["state"][0]}
    for saved in (renamed, swapped):
        a2, b2 = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
        fresh = Expectigrad([a2, b2], lr=0.1)
        fresh.load_state_dict(saved)
        state = fresh.state_dict()["state"]
        assert list(state) == [0] and torch.equal(state[0]["mean_sq"], sd["state"][0]["mean_sq"])


def test_a_bfloat16_gradient_of_a_float32_parameter_steps_as_its_float32_value():
    p, q = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    g = torch.tensor([0.5, -1.0, 0.0, 3.0], dtype=torch.bfloat16)
    p.grad, q.grad = torch.zeros(4), g.float()
    p.grad.data = g                 # as torch.amp code can leave it
    oa, ob = Expectigrad([p], lr=0.1), Expectigrad([q], lr=0.1)
    oa.step()
    ob.step()
    assert torch.equal(p, q)
