"""Param groups: the hyperparameters of a set of arrays, validated on every change.

``ParamGroup`` is a ``MutableMapping`` (not a ``dict``): every way of
changing it (``g[key] = v``, ``g.update(...)``, ``g |= {...}``,
``g.setdefault``) goes through one validating ``__setitem__``, and an update
of several keys is checked whole before any key changes.  Its ``"params"``
are a fixed tuple.  The guard survives ``copy.deepcopy`` and pickling: a
copy is a ``ParamGroup`` again, tied to the copied optimizer.

A group tells its optimizer that it changed through a shared ``Changes``
flag rather than a callback, so a group holds no reference to the
optimizer (no reference cycle: ``del opt`` frees it at once).
"""
from __future__ import annotations

from collections.abc import MutableMapping

from . import _validation as V

__all__ = ["Changes", "ParamGroup", "ParamList", "parse_groups"]

FIXED = ("params", "sparse_counter")


def parse_groups(params, defaults, check_param, is_array):
    """The param groups an optimizer was given, as dicts: ``defaults``
    updated by each group's own values (validated), and ``"params"``, its
    arrays as ``check_param(p, where)`` returns them.

    ``params`` is a sequence of arrays (one group) or of dicts with a
    ``"params"`` key; a group's ``"params"`` may be one array
    (``is_array``).  Raises ``TypeError``/``ValueError`` naming the group
    and what is wrong."""
    if isinstance(params, dict):
        raise TypeError("params must be an array, a sequence of arrays or a "
                        "sequence of dicts; got a single dict (wrap it in a list)")
    try:
        items = list(params)
    except TypeError:
        raise TypeError("params must be an array, a sequence of arrays or a "
                        f"sequence of dicts, got {type(params).__name__}") from None
    if not items:
        raise ValueError("params is empty: give at least one array to optimise")
    as_dicts = [isinstance(item, dict) for item in items]
    if any(as_dicts) and not all(as_dicts):
        raise TypeError("params mixes arrays and dicts; give either arrays or "
                        "param-group dicts")
    if not any(as_dicts):
        items = [{"params": items}]
    groups = []
    for gi, item in enumerate(items):
        where = f"param group {gi}: "
        if "params" not in item:
            raise ValueError(f"{where}missing the 'params' key")
        plist = item["params"]
        if is_array(plist):
            plist = [plist]
        try:
            plist = list(plist)
        except TypeError:
            raise TypeError(f"{where}'params' must be an array or a sequence of "
                            f"arrays, got {type(plist).__name__}") from None
        if not plist:
            raise ValueError(f"{where}'params' is empty")
        group = dict(defaults)
        for key, value in item.items():
            if key != "params":
                group[key] = V.check_group_value(key, value, where)
        group["params"] = [check_param(p, f"param group {gi} param {pi}")
                           for pi, p in enumerate(plist)]
        V.check_eps_dtypes(group["eps"], group["params"], where)
        V.check_step_size_dtypes(group["lr"], group["beta"], group["params"], where,
                                 group.get("weight_decay", 0.0))
        groups.append(group)
    return groups


class Changes:
    """A flag an optimizer and its groups share: set when a group changes."""

    __slots__ = ("dirty",)

    def __init__(self):
        self.dirty = True

    def __getstate__(self):
        return self.dirty

    def __setstate__(self, state):
        self.dirty = True          # a copy rebuilds whatever it cached


class ParamList(tuple):
    """The parameters of a group: fixed once the optimizer is built."""

    def _refuse(self, *args, **kwargs):
        raise ValueError("the parameters of a param group cannot be changed after the "
                         "optimizer is built; build a new optimizer (or another "
                         "param group) with the arrays you want")

    append = extend = insert = remove = pop = clear = __setitem__ = __delitem__ = _refuse
    __iadd__ = _refuse


class ParamGroup(MutableMapping):
    """The hyperparameters and ``"params"`` of one param group.

    Change hyperparameters between steps as with torch:
    ``opt.param_groups[0]["lr"] = 1e-4``.  A value that is not valid raises
    at once and the group keeps its old values.  ``"params"`` and
    ``"sparse_counter"`` are fixed once the optimizer is built; keys cannot
    be removed.

    Groups are made by ``Expectigrad``; users read and change them through
    ``opt.param_groups``.

    Parameters
    ----------
    values : mapping
        The group's settings, already validated: ``"params"`` (its arrays)
        and every hyperparameter (``lr``, ``beta``, ``eps``,
        ``sparse_counter``, ``weight_decay``, ``maximize``, ``clipvalue``,
        ``clipnorm``).
    where : str
        How error messages name the group (``"param group 1: "``).
    changes : Changes
        The flag shared with the optimizer, set on every change.

    Raises
    ------
    ValueError, TypeError
        On assignment: an invalid value (a learning rate that is negative,
        not finite or not a number; ``beta`` outside [0, 1); ...), a change
        of ``params`` or ``sparse_counter``, or a removal.
    """

    def __init__(self, values, where, changes):
        self._data = dict(values)
        self._data["params"] = ParamList(self._data["params"])
        self._where = where
        self._changes = changes

    def _checked(self, key, value):
        if key in FIXED:
            raise ValueError(f"{self._where}{key!r} cannot be changed after the "
                             "optimizer is built; build a new optimizer")
        value = V.check_group_value(key, value, self._where)
        if key == "eps":
            V.check_eps_dtypes(value, self._data["params"], self._where)
        return value

    def __getitem__(self, key):
        return self._data[key]

    def _checked_together(self, checked):
        merged = {**self._data, **checked}
        if "lr" in checked or "beta" in checked or "weight_decay" in checked:
            V.check_step_size_dtypes(merged["lr"], merged["beta"], merged["params"],
                                     self._where, merged.get("weight_decay", 0.0))
        return checked

    def __setitem__(self, key, value):
        checked = self._checked_together({key: self._checked(key, value)})
        self._data.update(checked)
        self._changes.dirty = True

    def update(self, other=(), /, **kwargs):
        """Set several hyperparameters: all are checked before any changes.

        Parameters
        ----------
        other : mapping or iterable of (key, value) pairs, optional
            Hyperparameters to set.
        **kwargs
            More hyperparameters to set.

        Raises
        ------
        ValueError, TypeError
            Any value is invalid; then none changes.
        """
        items = dict(other, **kwargs)
        checked = self._checked_together(
            {key: self._checked(key, value) for key, value in items.items()})
        self._data.update(checked)
        self._changes.dirty = True

    def __ior__(self, other):
        self.update(other)
        return self

    def __or__(self, other):
        return {**self._data, **dict(other)}

    def __delitem__(self, key):
        raise ValueError(f"{self._where}hyperparameters cannot be removed")

    def popitem(self):
        """Refused: hyperparameters cannot be removed (``ValueError``)."""
        raise ValueError(f"{self._where}hyperparameters cannot be removed")

    def clear(self):
        """Refused: hyperparameters cannot be removed (``ValueError``)."""
        raise ValueError(f"{self._where}hyperparameters cannot be removed")

    def pop(self, key, *default):
        """Refused: hyperparameters cannot be removed.

        Parameters
        ----------
        key : str
            Any key.
        *default
            Ignored.

        Raises
        ------
        ValueError
            Always.
        """
        raise ValueError(f"{self._where}hyperparameters cannot be removed")

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __repr__(self):
        return f"ParamGroup({self._data!r})"

    def _load(self, key, value):
        """Set an already validated value (``load_state_dict``)."""
        self._data[key] = value
        self._changes.dirty = True


def check_saved_groups(groups, sizes):
    """Raise ``ValueError`` unless a state dict's ``param_groups`` hold, group
    by group, as many parameters as the optimizer's groups (``sizes``)."""
    if len(groups) != len(sizes):
        raise ValueError(f"state dict has {len(groups)} param groups, the optimizer "
                         f"has {len(sizes)}")
    for gi, (g, size) in enumerate(zip(groups, sizes)):
        saved = len(g.get("params", ()))
        if saved != size:
            raise ValueError(f"state dict param group {gi}: has {saved} parameters, the "
                             f"optimizer's group has {size}")
