"""Expectigrad as a ``torch.optim.Optimizer``, stepping on the package's kernels.

A drop-in for the original project's ``expectigrad.pytorch.Expectigrad``::

    from expectigrad_np.pytorch import Expectigrad      # was: from expectigrad.pytorch ...
    opt = Expectigrad(model.parameters(), lr=1e-3)

Bookkeeping follows torch's conventions (param groups, closures, ``zero_grad``,
``lr_scheduler``, ``GradScaler``, ``state_dict``); the arithmetic is
``expectigrad_np.Expectigrad``'s: CPU float32/float64 tensors are updated in
place by the fused CPU kernels through zero-copy ``.numpy()`` views, every
tensor of a dtype in one compiled call; CUDA tensors go to the cuda backend
through ``__cuda_array_interface__``.

Differences from the original
-----------------------------
- Per-group ``beta`` and ``sparse_counter`` are honoured.  The original
  decides whether momentum exists and which counter to use from the
  constructor's values for every group.
- ``weight_decay`` (decoupled, as in AdamW, with the scheduled ``lr``) and
  ``maximize`` exist.
- State is stored as the running mean ``mean_sq = sum / counter`` and a
  ``uint32`` count (see ``expectigrad_np.reference``); ``load_state_dict``
  converts a state dict saved by the original optimizer (``sum``, float
  ``counter``).
- The state lives in the kernels' flat buffers: ``opt.state`` stays empty,
  and ``state_dict()`` returns copies (``step``, ``mean_sq``, ``count``,
  ``momentum`` per parameter).

Importing this module imports torch; ``import expectigrad_np`` does not.
"""
from __future__ import annotations

import collections
import math

import numpy as np
import torch
from torch.optim import optimizer as _torch_optimizer

from . import _validation as V
from .optimizer import Expectigrad as _Core
from .param_groups import check_saved_groups

__all__ = ["Expectigrad"]

_DTYPES = (torch.float32, torch.float64)
# Group keys the kernels read (others, such as a scheduler's ``initial_lr``,
# stay torch's business).
_KEYS = ("beta", "eps", "weight_decay", "maximize")


def _check_hyper(group, saved=False):
    """The original's checks and messages for lr, beta and eps; ours for the
    rest.  A ``saved`` group (``load_state_dict``) may hold any lr a step
    takes (``_current_lr``): a scheduler's 0, a tensor."""
    lr, beta, eps = group["lr"], group["beta"], group["eps"]
    if saved:
        _current_lr(lr, "the state dict's lr")
    elif isinstance(lr, torch.Tensor):          # as the original takes it: read each step
        if not _current_lr(lr, "lr") > 0.0:
            raise ValueError(f"lr must be greater than 0 but got {lr}")
    elif not lr > 0.0:
        raise ValueError(f"lr must be greater than 0 but got {lr}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0,1) but got {beta}")
    if not eps > 0.0:
        raise ValueError(f"eps must be greater than 0 but got {eps}")
    for key in ("beta", "eps", "weight_decay", "sparse_counter", "maximize") + (
            () if saved or isinstance(lr, torch.Tensor) else ("lr",)):
        V.check_group_value(key, group[key])


def _current_lr(lr, where):
    """A group's lr as a step takes it: a number or a one-element tensor,
    finite and >= 0 (schedulers reach 0); as a float."""
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)):
        raise TypeError(f"{where} is {lr!r}; it must be a float")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where} is {lr!r}; it must be finite and >= 0")
    return float(lr)


def _row_sparse(grad, p, where):
    """A torch sparse COO gradient as ``RowSparse`` over ``p``'s rows (CPU):
    indices along the first sparse dimension; values gathered into rows.
    One with no sparse dimension (every element in its values) is dense."""
    from .sparse import RowSparse
    if grad.device.type != "cpu":
        raise TypeError(f"{where} has a sparse CUDA gradient; sparse gradients are taken "
                        "on the CPU (pass a dense gradient on the device)")
    if grad.dtype != p.dtype or tuple(grad.shape) != tuple(p.shape):
        raise TypeError(f"{where} has a sparse gradient of dtype {grad.dtype} and shape "
                        f"{tuple(grad.shape)}; the parameter has {p.dtype} {tuple(p.shape)}")
    k = grad.sparse_dim()
    if k == 0 or p.dim() == 0:     # no rows to name: the gradient is dense
        return grad.to_dense().detach().numpy()
    if not grad.is_coalesced():
        # Duplicate entries summed as torch sums them (``to_dense`` gives the
        # same bits): the step is the dense gradient's, bit for bit.
        grad = grad.detach().coalesce()
    indices = grad._indices().numpy()
    values = grad._values().detach().numpy()
    if k == 1:                                    # nn.Embedding: whole rows
        return RowSparse(indices[0], values)
    rows, inverse = np.unique(indices[0], return_inverse=True)
    dense_rows = np.zeros((rows.size,) + tuple(p.shape[1:]), values.dtype)
    np.add.at(dense_rows, (inverse.reshape(-1),) + tuple(indices[1:k]), values)
    return RowSparse(rows, dense_rows)


def _check_param(p, where):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where} is a {type(p).__name__}; Expectigrad optimizes "
                        "torch tensors (model.parameters())")
    if p.is_complex() or p.dtype not in _DTYPES:
        raise TypeError(f"{where} has dtype {p.dtype}; the Expectigrad kernels take "
                        "torch.float32 or torch.float64 parameters. Keep float32 "
                        "parameters and use torch.autocast for lower-precision compute")
    if p.device.type not in ("cpu", "cuda"):
        raise TypeError(f"{where} is on device {p.device}; CPU and CUDA tensors are "
                        "supported")
    if p.is_sparse:
        raise TypeError(f"{where} is a sparse tensor; parameters must be dense")
    if torch._debug_has_internal_overlap(p) == 1:
        raise ValueError(f"{where} has elements that share memory (an expanded or "
                         "as_strided tensor), which an in-place update cannot step; "
                         "pass a tensor that owns its elements (p.clone())")


class Expectigrad(torch.optim.Optimizer):
    r"""Expectigrad (Daley & Amato, 2020) for PyTorch, on fused kernels.

    Per element of each parameter, on that parameter's ``t``-th step::

        s <- s + g**2;  n <- n + sign(g**2)   (or n = t without the sparse counter)
        m <- beta * m + (1 - beta) * g / (eps + sqrt(s / n))      0/0 := 0
        x <- x * (1 - lr * weight_decay) - lr / (1 - beta**t) * m

    Parameters
    ----------
    params : iterable of tensors or of dicts
        Parameters (float32 or float64, CPU or CUDA) or param groups.
    lr : float > 0, default 1e-3
    beta : float in [0, 1), default 0.9
        Outer-momentum decay; 0: no momentum and no bias correction.
    eps : float > 0, default 1e-8
    sparse_counter : bool, default True
        Count only nonzero gradients (True) or every step (False).
    weight_decay : float >= 0, default 0
        Decoupled weight decay (AdamW's), with the step's ``lr``.
    maximize : bool, default False
        Maximise the objective (the gradient's sign is flipped).

    lazy : bool, default False
        Sparse gradients (``nn.Embedding(sparse=True)``) update only their
        rows; the others lag until touched or ``sync()`` (see
        ``expectigrad_np.Expectigrad``).  Without it a sparse step visits
        every row whose update is not zero.
    check_finite : bool, default True
        Refuse a step whose gradients hold NaN or infinity, changing
        nothing (``FloatingPointError``).  The check reads every gradient
        once more before the update; ``False`` skips it, as torch's own
        optimizers do (``torch.amp.GradScaler`` checks for them itself),
        and a NaN then reaches the parameters.

    A parameter whose ``.grad`` is None is skipped and its step count does
    not advance.  Sparse COO gradients (CPU) step exactly as their dense
    form would, at the cost of the rows they touch.  Raises ``ValueError``
    with the original's messages for a bad ``lr``, ``beta`` or ``eps``, and
    ``TypeError`` for parameters of another dtype or device.
    """

    def __init__(self, params, lr=1e-3, beta=0.9, eps=1e-8, sparse_counter=True, *,
                 weight_decay=0.0, maximize=False, lazy=False, check_finite=True):
        defaults = dict(lr=lr, beta=beta, eps=eps, sparse_counter=sparse_counter,
                        weight_decay=weight_decay, maximize=maximize)
        _check_hyper(defaults)
        if not isinstance(lazy, bool):
            raise TypeError(f"lazy must be a bool, got {lazy!r}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        self._lazy = lazy
        self._check_finite = check_finite
        self._core = None
        self._order = []
        super().__init__(params, defaults)
        self.state = _State()

    # --- groups ------------------------------------------------------------------

    def add_param_group(self, param_group):
        """torch's ``add_param_group``, with the hyperparameters and the
        parameters' dtype and device checked first; the kernels' state of
        the existing parameters is kept.

        Parameters
        ----------
        param_group : dict
            ``{"params": tensors, ...}`` with optional ``lr``, ``beta``,
            ``eps``, ``sparse_counter``, ``weight_decay``, ``maximize``
            (the constructor's defaults otherwise).

        Raises
        ------
        ValueError, TypeError
            An invalid hyperparameter, or parameters of an unsupported dtype
            (float16, bfloat16, complex) or on another device kind.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hyper(group)
            gi = len(self.param_groups) - 1
            first = {}
            for i, p in enumerate(group["params"]):
                _check_param(p, f"param group {gi} param {i}")
                if first.setdefault(id(p), i) != i:
                    raise ValueError(f"param group {gi} lists the same parameter twice "
                                     f"(params {first[id(p)]} and {i}); list each once")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        # The next step sees one more parameter and rebuilds the core, the
        # others' state carried over (_sync).

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _build(self, carried):
        """The core optimizer over views of the parameters (rebuilt when the
        parameters change), with ``carried`` state (``_carried``) loaded
        into it.  Nothing of the optimizer changes unless both succeed."""
        groups = []
        for gi, g in enumerate(self.param_groups):
            views = [_host_view(p, f"param group {gi} param {i}")
                     for i, p in enumerate(g["params"])]
            groups.append(dict({k: g[k] for k in _KEYS}, params=views,
                               sparse_counter=g["sparse_counter"],
                               lr=_GroupLR(g, gi)))
        core = _Core(groups, lazy=self._lazy, check_finite=self._check_finite)
        params = self._params()
        retired = getattr(self, "_retired", {})
        if not isinstance(carried, dict):
            # A parameter taken out of the groups keeps its state for when it
            # comes back, as in torch's optimizers (their ``state`` is keyed
            # by the parameter).
            carried = list(carried or ()) + list(retired.values())
            present = {id(p) for p in params}
            retired = {id(p): (p, entry) for p, entry in carried if id(p) not in present}
        if carried:
            self._import_state(carried, core, params)
        self._core = core
        self._retired = retired
        self._synced = [tuple(g[k] for k in _KEYS) for g in self.param_groups]
        self._order = [(p, p.device.type == "cpu") for p in params]
        # Where each parameter's memory is and how its elements lie in it: a
        # change (``p.data = ...``, ``p.data = p.data.t()``, ``p.data[:2]``)
        # leaves the core's views stale, so the next step rebuilds them.
        self._layouts = [(p.data_ptr(), p.stride(), p.shape) for p, _ in self._order]
        self._pending_state = None
        return core

    def _sync(self):
        """The core, rebuilt where the parameters changed (one added,
        replaced, moved to other storage or laid out anew in it, as by
        ``p.data = p.data.t()``; each one's state goes with it),
        with the groups' hyperparameters carried over where they changed."""
        core = self._core
        params = self._params()
        moved = core is None or len(params) != len(self._order)
        if not moved:
            for p, (q, _), layout in zip(params, self._order, self._layouts):
                if p is not q or (p.data_ptr(), p.stride(), p.shape) != layout:
                    moved = True
                    break
        if moved:
            if core is None:
                return self._build(getattr(self, "_pending_state", None))
            self._check_counters(core)
            return self._build(self._carried())
        self._check_counters(core)
        for gi, g in enumerate(self.param_groups):
            now = tuple(g[k] for k in _KEYS)
            if now != self._synced[gi]:
                for key, value in zip(_KEYS, now):
                    core.param_groups[gi][key] = value
                self._synced[gi] = now
        return core

    def _check_counters(self, core):
        """``sparse_counter`` of a group cannot change: the state it keeps
        means something else under the other counter."""
        for gi, (g, built) in enumerate(zip(self.param_groups, core.param_groups)):
            if g["sparse_counter"] != built["sparse_counter"]:
                raise ValueError(f"param group {gi}: sparse_counter cannot change after "
                                 "the optimizer is built (it was "
                                 f"{built['sparse_counter']}); nothing was changed")

    # --- stepping ----------------------------------------------------------------

    def step(self, closure=None):
        """One step over every parameter with a gradient; returns the
        closure's loss (None without a closure).

        torch's step hooks and profiler label apply as to any optimizer;
        when none is registered and the profiler is off, the step skips
        torch's wrapper (``record_function`` alone costs several µs, more
        than the kernels on small models).

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss; called with
            gradients enabled before the step.

        Raises
        ------
        ValueError, TypeError
            A gradient the kernels cannot take (such as a sparse gradient on
            a CUDA tensor); nothing changes.
        FloatingPointError
            NaN or infinity in a gradient (``check_finite``); nothing changes.
        """
        if _hooks_active(self):
            return _HOOKED_STEP(self, closure)
        return self._step(closure)

    step.hooked = True              # torch's __init__ must not wrap it again

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        core = self._sync()
        grads = []
        for p, on_cpu in self._order:
            grad = p.grad
            if grad is None:
                grads.append(None)
            elif grad.is_sparse:
                grads.append(_row_sparse(grad, p, self._where(p)))
            elif on_cpu:
                # No tensor operation runs here (the kernels write through
                # NumPy views), so autograd needs no no_grad context.
                if grad.dtype != p.dtype and grad.is_floating_point():
                    grad = grad.detach().to(p.dtype)    # bfloat16/float16: no NumPy dtype
                try:
                    grads.append(grad.numpy())
                except RuntimeError:    # a gradient that requires grad, a negative view
                    grads.append(grad.detach().resolve_neg().resolve_conj().numpy())
            else:
                grads.append(grad.detach())
        core.step(grads)
        # The parameters changed in place where torch cannot see it: a
        # backward through a graph that saved them must fail, as after any
        # optimizer's step, not use the new values.
        _modified([p for (p, _), g in zip(self._order, grads) if g is not None])
        if not self.state.stepped:
            self.state.stepped = True
        return loss

    def sync(self, param=None, rows=None):
        """Bring lagging rows of a ``lazy=True`` optimizer up to date: all of
        them, those of one parameter, or rows ``rows`` (an index tensor or
        array) of one parameter (``expectigrad_np.Expectigrad.sync``).

        Parameters
        ----------
        param : torch.Tensor or int, optional
            One parameter, or its index; default: every parameter.
        rows : tensor or array_like of int, optional
            Rows of ``param`` (indices along its first axis); needs ``param``.

        Raises
        ------
        ValueError, TypeError
            A parameter or rows the optimizer does not have.
        """
        core = self._sync()
        index = None
        if isinstance(param, (int, np.integer)) and not isinstance(param, bool):
            if not 0 <= param < len(self._order):
                raise ValueError(f"sync(param={param}): the optimizer has "
                                 f"{len(self._order)} parameters")
            index = int(param)
        elif param is not None:
            index = next((i for i, (q, _) in enumerate(self._order) if q is param), None)
            if index is None:
                raise ValueError("sync(param=...) takes one of the optimizer's parameters "
                                 "or its index")
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        core.sync(index, rows)

    def _where(self, p):
        for gi, g in enumerate(self.param_groups):
            for i, q in enumerate(g["params"]):
                if q is p:
                    return f"param group {gi} param {i}"
        return "a parameter"

    # --- state -------------------------------------------------------------------

    def _carried(self):
        """The core's state as ``[(parameter, entry), ...]`` (``_export_state``
        entries): what a rebuilt core, or a copy, takes over, each entry
        matched to its parameter by identity."""
        return [(self._order[i][0], entry) for i, entry in self._export_state().items()]

    def _export_state(self):
        """Per-parameter state from the kernels' buffers, as copies:
        ``{index: {"step", "mean_sq", ["count"], ["momentum"]}}``, indexed
        as the core's parameters; none for a parameter never stepped."""
        core = self._core if self._core is not None else self._sync()
        out = {}
        params = [p for p, _ in self._order]
        for i, entry in core.state_dict()["state"].items():
            if int(entry["step"]) == 0 and not any(
                    np.any(v) for k, v in entry.items() if k != "step"):
                continue        # never stepped: no state, as in torch's optimizers
            p = params[i]
            # float64: a count past 2**24 steps comes back exactly (torch's
            # float32 step tensors round it).
            out[i] = {"step": torch.tensor(float(entry["step"]), dtype=torch.float64)}
            for key in ("mean_sq", "count", "momentum"):
                if key in entry:
                    a = np.asarray(entry[key])
                    if key == "count":
                        a = a.astype(np.int64)
                    out[i][key] = torch.from_numpy(np.array(a)).to(p.device)
        return out

    def state_dict(self):
        """torch's format: ``{"state": {index: {"step", "mean_sq", "count",
        "momentum"}}, "param_groups": [...]}``, state tensors copied from the
        kernels' buffers (``count`` as int64).  torch's state-dict hooks
        run as for any optimizer; the post-hooks see the state."""
        self._sync()
        hooks = getattr(self, "_optimizer_state_dict_post_hooks", None)
        if hooks:
            self._optimizer_state_dict_post_hooks = type(hooks)()
        try:
            sd = super().state_dict()
        finally:
            if hooks:
                self._optimizer_state_dict_post_hooks = hooks
        sd["state"] = self._export_state()
        for hook in (hooks or {}).values():
            returned = hook(self, sd)
            if returned is not None:
                sd = returned
        return sd

    def load_state_dict(self, state_dict):
        """Load ``state_dict()`` output, or a state dict of the original
        optimizer (``sum`` and a float ``counter``, converted to the running
        mean and a count).  Tensors are copied, never shared.  Everything is
        checked before anything changes.

        Parameters
        ----------
        state_dict : dict
            ``{"state": ..., "param_groups": ...}`` as torch optimizers save
            it, from this optimizer or from the original one.  A parameter
            with no entry (never stepped when it was saved) starts afresh.

        Raises
        ------
        ValueError, TypeError
            The state dict does not match the parameters; nothing changes.
        """
        for hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            returned = hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        self._load(state_dict)
        for hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            hook(self)

    def _load(self, state_dict):
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(groups, (list, tuple)) or not isinstance(state, dict):
            raise ValueError("not an optimizer state dict: it needs 'state' and "
                             "'param_groups'")
        check_saved_groups(groups, [len(g["params"]) for g in self.param_groups])
        new_groups = []
        for gi, (saved, g) in enumerate(zip(groups, self.param_groups)):
            merged = dict(g)
            merged.update({k: v for k, v in saved.items() if k != "params"})
            for key in ("weight_decay", "maximize", "sparse_counter"):
                merged.setdefault(key, self.defaults[key])
            _check_hyper(merged, saved=True)
            if merged["sparse_counter"] != g["sparse_counter"]:
                raise ValueError(f"param group {gi}: sparse_counter differs from the "
                                 "optimizer's")
            new_groups.append(merged)
        params = self._params()
        # The saved groups name their parameters' state keys, matched to the
        # parameters by position, as torch does (torch.distributed.checkpoint
        # saves keys of its own).  A parameter whose key has no entry (never
        # stepped when it was saved) starts afresh, as in torch.
        keys = [k for g in groups for k in g["params"]]
        converted = {}
        for i, (p, key) in enumerate(zip(params, keys)):
            try:
                entry = state.get(key)
            except TypeError:
                raise ValueError(f"state dict param_groups name parameter {i} by {key!r}, "
                                 "which cannot be a key of its state") from None
            if entry is None:
                continue
            converted[i] = _converted(entry, p, f"state dict entry {key!r}",
                                      new_groups, self._group_index(i))
        core = self._sync()
        core_sd = core.state_dict()
        for i, entry in core_sd["state"].items():
            core_sd["state"][i] = converted.get(i) or {
                k: (0 if k == "step" else np.zeros_like(v)) for k, v in entry.items()}
        core_sd["param_groups"] = [
            {"params": g["params"], **{k: ng[k] for k in ("beta", "eps", "weight_decay",
                                                          "maximize")}}
            for g, ng in zip(core_sd["param_groups"], new_groups)]
        core.load_state_dict(core_sd)
        for g, merged in zip(self.param_groups, new_groups):
            params_of = g["params"]
            g.clear()
            g.update(merged)
            g["params"] = params_of
        self._synced = [tuple(g[k] for k in _KEYS) for g in self.param_groups]
        self.state.stepped = bool(converted)

    @staticmethod
    def _import_state(carried, core, params):
        """Load ``_carried`` output into ``core`` (over ``params``): each
        entry into its parameter's place, where it still has one.  (An
        ``{index: entry}`` dict, as copies made by earlier versions hold,
        loads by index.)"""
        core_sd = core.state_dict()
        if isinstance(carried, dict):
            placed = carried.items()
        else:
            place = {id(p): i for i, p in enumerate(params)}
            placed = [(place[id(p)], entry) for p, entry in carried if id(p) in place]
        for i, entry in placed:
            shape = tuple(entry["mean_sq"].shape)
            if shape != tuple(params[i].shape):
                raise ValueError(
                    f"parameter {i} changed shape from {shape} to {tuple(params[i].shape)} "
                    "since the optimizer stepped it: its state no longer fits (torch's "
                    "optimizers cannot step it either); nothing was changed. Give it its "
                    "shape back, or build a new optimizer")
            core_sd["state"][i] = {k: (int(v) if k == "step" else v.cpu().numpy())
                                   for k, v in entry.items()}
        core_sd["param_groups"] = [{"params": g["params"]} for g in core_sd["param_groups"]]
        core.load_state_dict(core_sd)

    def _group_index(self, i):
        start = 0
        for gi, g in enumerate(self.param_groups):
            if i < start + len(g["params"]):
                return gi
            start += len(g["params"])
        raise IndexError(i)

    def __getstate__(self):
        """Pickling and ``copy.deepcopy``: the kernels' state travels as
        tensors and moves into the copy's own buffers on its first use."""
        state = super().__getstate__()
        pending = getattr(self, "_pending_state", None)
        state["_pending_state"] = self._carried() if self._core is not None else pending
        state["_settings"] = dict(lazy=self._lazy, check_finite=self._check_finite)
        return state

    def __setstate__(self, state):
        pending = state.pop("_pending_state", None)
        settings = state.pop("_settings", {})
        super().__setstate__(state)
        self._lazy = settings.get("lazy", False)
        self._check_finite = settings.get("check_finite", True)
        self._core = None
        self._order = []
        self._layouts = []
        self._pending_state = pending
        if not isinstance(self.state, _State):     # pickled by an earlier version
            self.state = _State(bool(pending))


Expectigrad._step.__name__ = "step"               # the profiler's label
_HOOKED_STEP = torch.optim.Optimizer.profile_hook_step(Expectigrad._step)
_GLOBAL_PRE = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
_GLOBAL_POST = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)


def _hooks_active(opt):
    """Whether torch's step wrapper has work to do: a step hook (global or
    the optimizer's) or a running profiler.  True where this torch keeps
    them elsewhere."""
    if _GLOBAL_PRE is None or _GLOBAL_POST is None:
        return True
    return bool(_GLOBAL_PRE or _GLOBAL_POST or opt._optimizer_step_pre_hooks
                or opt._optimizer_step_post_hooks
                or getattr(torch.autograd.profiler, "_is_profiler_enabled", True))


class _State(collections.defaultdict):
    """``optimizer.state``: empty (the state lives in the kernels' buffers;
    ``state_dict()`` gives it), but true once a step has been taken or a
    stepped state loaded, as torch's optimizers' state is.  Tools read an
    empty state as an optimizer never stepped: torch.distributed.checkpoint
    would take a step of zero gradients to make its state."""

    def __init__(self, stepped=False):
        super().__init__(dict)
        self.stepped = stepped

    def __bool__(self):
        return self.stepped or len(self) > 0

    def __reduce__(self):
        return type(self), (self.stepped,), None, None, iter(self.items())


class _GroupLR:
    """The core's lr for one group: whatever ``group["lr"]`` holds now (the
    schedulers of ``torch.optim.lr_scheduler`` write it)."""

    def __init__(self, group, index):
        self.group, self.index = group, index

    def __call__(self, step):
        # Checked here, with torch's words for it: the core would call a bad
        # value a schedule's.
        return _current_lr(self.group["lr"], f"param_groups[{self.index}]['lr'] (set by "
                           "hand or by an lr scheduler)")


def _modified(tensors):
    """Bump the autograd version of ``tensors`` (written by the kernels)."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:       # torch before 2.6 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _host_view(p, where):
    """What the core updates in place: a NumPy view of a CPU tensor's
    memory, the tensor itself on CUDA (``__cuda_array_interface__``)."""
    _check_param(p, where)
    t = p.detach()
    return t.numpy() if t.device.type == "cpu" else t


def _as_numpy(value, where):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _converted(entry, p, where, groups, gi):
    """A torch-format entry (ours, or the original's ``sum``/``counter``) as
    the core's ``{"step", "mean_sq", ["count"], ["momentum"]}``; the core's
    ``load_state_dict`` checks shapes, ranges and dtypes."""
    if not isinstance(entry, dict) or "step" not in entry:
        raise ValueError(f"{where} must be a dict with 'step'")
    step = entry["step"]
    step = float(step.item() if isinstance(step, torch.Tensor) else step)
    if not (math.isfinite(step) and step >= 0 and step == int(step)):
        raise ValueError(f"{where}: 'step' must be a whole number >= 0, got {step!r}")
    t = int(step)
    out = {"step": t}
    dtype = {torch.float32: np.float32, torch.float64: np.float64}[p.dtype]
    if "mean_sq" in entry:                                     # ours
        out["mean_sq"] = _as_numpy(entry["mean_sq"], where)
        if "count" in entry:
            count = _as_numpy(entry["count"], where)
            if count.dtype.kind == "f":
                if np.any(count != np.floor(count)) or not np.all(np.isfinite(count)):
                    raise ValueError(f"{where}: 'count' holds non-integers")
                count = count.astype(np.int64)
            out["count"] = count
    elif "sum" in entry:                                       # the original's
        s = _as_numpy(entry["sum"], where).astype(np.float64)
        if "counter" in entry:
            n = _as_numpy(entry["counter"], where).astype(np.float64)
            if np.any(n != np.floor(n)) or np.any(n < 0):
                raise ValueError(f"{where}: 'counter' must hold whole numbers >= 0")
            with np.errstate(invalid="ignore", divide="ignore"):
                out["mean_sq"] = np.where(n > 0, s / np.maximum(n, 1), 0.0).astype(dtype)
            out["count"] = n.astype(np.int64)     # whole: the core checks the range
        else:
            out["mean_sq"] = (s / t if t > 0 else np.zeros_like(s)).astype(dtype)
            if groups[gi]["sparse_counter"]:
                # The original counted every step for this array: n = t.
                out["count"] = np.full(s.shape, t, np.int64)
    else:
        raise ValueError(f"{where} holds neither 'mean_sq' (this optimizer) nor 'sum' "
                         "(the original expectigrad optimizer)")
    if "momentum" in entry:
        out["momentum"] = _as_numpy(entry["momentum"], where)
    return out
