"""Harmony's settings as one frozen value, shared by harmonize, build_reference, the CLI and Reference.params.

This module imports nothing heavy, so that the command line takes its defaults from here and still
answers ``--help`` at once.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Flavor = Literal["harmony1", "harmony2"]
PerKey = float | tuple[float, ...]

#: Settings whose default depends on the flavor: harmony 0.1's as Symphony runs it, and harmonypy
#: 2.1's (``lamb=None``: the ridge penalty estimated as ``alpha E``; ``n_init=1``: one k-means++ start).
FLAVOR_DEFAULTS: dict[str, dict[str, float | int | None]] = {
    "harmony1": dict(
        lamb=1.0, max_iter_harmony=20, max_iter_cluster=200, epsilon_cluster=1e-5, epsilon_harmony=1e-4, n_init=10
    ),
    "harmony2": dict(
        lamb=None,
        alpha=0.2,
        batch_prop_cutoff=1e-5,
        max_iter_harmony=10,
        max_iter_cluster=4,
        epsilon_cluster=1e-3,
        epsilon_harmony=1e-2,
        n_init=1,
    ),
}
#: Settings a flavor does not use.
IGNORED = {"harmony1": ("alpha", "batch_prop_cutoff"), "harmony2": ()}


@dataclass(frozen=True)
class _Range:
    """The values a Harmony setting may take, as a test and in words, and what the setting does."""

    allows: Callable[[float], bool]
    words: str
    what: str
    integer: bool = False
    per_key: bool = False


def _number(v: float) -> bool:
    return not math.isnan(v)


#: The numeric settings :meth:`HarmonySettings.check` checks (``None`` always stands for the flavor's
#: default, or for ``lamb``, ``alpha`` and ``batch_prop_cutoff``, for "not used").
RANGES = {
    "theta": _Range(lambda v: v >= 0, "at least 0", "the diversity penalty", per_key=True),
    "tau": _Range(lambda v: v >= 0, "at least 0", "the small-batch discount of the penalty", per_key=True),
    "lamb": _Range(lambda v: v >= 0, "at least 0", "the ridge penalty", per_key=True),
    "sigma": _Range(lambda v: v > 0, "greater than 0", "the soft k-means entropy regularization"),
    "alpha": _Range(lambda v: v >= 0, "at least 0", "the factor of the estimated ridge penalty"),
    "batch_prop_cutoff": _Range(
        lambda v: 0 <= v <= 1,
        "between 0 and 1",
        "the share of a cluster below which a batch is left out of its correction",
    ),
    "block_size": _Range(
        lambda v: 0 < v <= 1, "greater than 0 and at most 1", "the fraction of cells updated together"
    ),
    "max_iter_harmony": _Range(lambda v: v >= 1, "at least 1", "the most Harmony iterations", integer=True),
    "max_iter_cluster": _Range(
        lambda v: v >= 1, "at least 1", "the most clustering iterations per Harmony iteration", integer=True
    ),
    "max_iter": _Range(lambda v: v >= 1, "at least 1", "the most soft k-means iterations", integer=True),
    "n_init": _Range(lambda v: v >= 1, "at least 1", "the number of k-means starts", integer=True),
    "epsilon_cluster": _Range(
        _number, "a number (a negative one never stops early)", "the relative tolerance of the clustering objective"
    ),
    "epsilon_harmony": _Range(
        _number, "a number (a negative one never stops early)", "the relative tolerance of Harmony's objective"
    ),
}


@dataclass(frozen=True)
class HarmonySettings:
    """Every setting of a Harmony run; ``None`` stands for the flavor's default until :meth:`resolved`.

    The defaults here are the defaults of :func:`~symphony_dask.build_reference` and of the command line;
    :func:`~symphony_dask.harmonize` documents each setting.
    """

    flavor: Flavor = "harmony1"
    theta: PerKey = 2.0
    tau: PerKey = 0.0
    sigma: float = 0.1
    lamb: PerKey | None = None
    alpha: float | None = None
    batch_prop_cutoff: float | None = None
    block_size: float = 0.05
    max_iter_harmony: int | None = None
    max_iter_cluster: int | None = None
    epsilon_cluster: float | None = None
    epsilon_harmony: float | None = None
    n_init: int | None = None
    seed: int = 111

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], *, flavor: str) -> HarmonySettings:
        """The settings among a function's keyword ``arguments`` (its ``locals()``), named as the fields."""
        return cls(flavor=flavor, **fields_of(cls, arguments, skip=("flavor",)))

    def resolved(self, n_keys: int) -> HarmonySettings:
        """The settings with the flavor's defaults filled in and checked against ``n_keys`` batch keys.

        Settings the flavor does not use are warned about (when given) and set to ``None``; a value out
        of range raises, naming the setting as the caller spells it.
        """
        if self.flavor not in FLAVOR_DEFAULTS:
            from symphony_dask._io.validation import option

            raise ValueError(f"{option('harmony_flavor', self.flavor)}: must be 'harmony1' or 'harmony2'")
        values = dataclasses.asdict(self)
        for name in IGNORED[self.flavor]:
            if values[name] is not None:
                warnings.warn(
                    f"{name} is a harmony2 setting; flavor={self.flavor!r} ignores it", UserWarning, stacklevel=3
                )
            values[name] = None
        for name, default in FLAVOR_DEFAULTS[self.flavor].items():
            if values[name] is None:
                values[name] = default
        check_harmony_settings(n_keys, **{name: values[name] for name in RANGES if name in values})
        for name in ("theta", "tau", "lamb"):  # one value per batch key: a tuple (frozen, comparable)
            if _iterable(values[name]):
                values[name] = tuple(float(v) for v in values[name])
        return HarmonySettings(**values)

    def check(self, n_keys: int) -> None:
        """Raise when a setting is out of its range (:data:`RANGES`).

        A per-key setting must have one value or one per batch key.
        """
        check_harmony_settings(n_keys, **{name: getattr(self, name) for name in RANGES if hasattr(self, name)})

    def params(self) -> dict[str, Any]:
        """The settings as a reference records them (``Reference.params``; the flavor as ``harmony_flavor``)."""
        out = {
            name: list(value) if isinstance(value, tuple) else value for name, value in dataclasses.asdict(self).items()
        }
        out["harmony_flavor"] = out.pop("flavor")
        return out

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> HarmonySettings:
        """The settings a reference's ``params`` recorded (see :meth:`params`); absent ones take their defaults."""
        names = {field.name for field in dataclasses.fields(cls)}
        given = {name: params[name] for name in names - {"flavor"} if params.get(name) is not None}
        if "harmony_flavor" in params:
            given["flavor"] = params["harmony_flavor"]
        for name in ("theta", "tau", "lamb"):
            if isinstance(given.get(name), list):
                given[name] = tuple(given[name])
        return cls(**given)


def fields_of(cls: type, arguments: Mapping[str, Any], *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values in ``arguments`` of the fields of the dataclass ``cls`` (but those in ``skip``)."""
    return {field.name: arguments[field.name] for field in dataclasses.fields(cls) if field.name not in skip}


def check_harmony_settings(n_keys: int, **settings: float | Sequence[float] | None) -> None:
    """Raise, before any work, when a Harmony setting of :data:`RANGES` is out of its range.

    A per-key setting (``theta``, ``tau``, ``lamb``) takes one value or one per batch key (of ``n_keys``).
    Settings are named as the caller spells them (:func:`~symphony_dask._io.validation.option`); ``None``
    (a default) is not checked.
    """
    from symphony_dask._io.validation import option

    for name, value in settings.items():
        if value is None:
            continue
        rule = RANGES[name]
        kind = "whole number" if rule.integer else "number"
        per_key = ", or one per batch key" if rule.per_key else ""
        values = _items(value)
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise TypeError(f"{option(name, value)}: {rule.what} must be a {kind}{per_key}") from None
        if len(values) != 1 and not (rule.per_key and len(values) == n_keys):
            expected = f"one value or one per batch key ({n_keys})" if rule.per_key else "one value"
            raise ValueError(f"{option(name, value)}: {rule.what} takes {expected}, got {len(values)}")
        for v in values:
            if not rule.allows(v) or math.isinf(v) or (rule.integer and not v.is_integer()):
                raise ValueError(f"{option(name, value)}: {rule.what} must be a finite {kind} {rule.words}")


def _iterable(value: object) -> bool:
    return hasattr(value, "__iter__") and not isinstance(value, (str, bytes))


def _items(value: object) -> list:
    """The values of a setting given as one value or as a sequence (list, tuple, NumPy array)."""
    return list(value) if _iterable(value) else [value]  # type: ignore[call-overload]
