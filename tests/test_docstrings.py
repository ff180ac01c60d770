"""Every public function's numpydoc "Parameters" section names its parameters, no more and no fewer
(issue #23): the public names of ``symphony_dask``, the public methods of its classes, and the
functions of ``sd.pl`` and ``sd.datasets``."""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable, Iterator

import pytest

import symphony_dask as sd

#: The numpydoc sections that list parameters.
SECTIONS = ("Parameters", "Other Parameters")


def _module_functions(module: types.ModuleType) -> Iterator[tuple[str, Callable]]:
    """The public functions that ``module`` defines itself (not those it imports)."""
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        value = getattr(module, name)
        if inspect.isfunction(value) and value.__module__ == module.__name__:
            yield f"{module.__name__.removeprefix('symphony_dask.')}.{name}", value


def _public_callables() -> Iterator[tuple[str, Callable]]:
    for name in sd.__all__:
        value = getattr(sd, name)
        if isinstance(value, types.ModuleType):
            yield from _module_functions(value)
        elif inspect.isclass(value):
            if not hasattr(value, "__dataclass_fields__"):  # a dataclass's fields are its attributes
                yield name, value
            for attr, member in vars(value).items():
                if attr.startswith("_"):
                    continue
                if isinstance(member, classmethod | staticmethod):
                    member = member.__func__
                if inspect.isfunction(member):
                    yield f"{name}.{attr}", member
        else:
            yield name, value


PUBLIC = dict(_public_callables())


def documented_parameters(doc: str | None) -> list[str]:
    """The names of a numpydoc docstring's parameter sections; ``a, b`` and ``a, b : int`` name two."""
    lines = inspect.cleandoc(doc or "").splitlines()
    names: list[str] = []
    inside = False
    for i, line in enumerate(lines):
        underline = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and re.fullmatch(r"-{3,}", underline.strip()):  # a section heading
            inside = line.strip() in SECTIONS
        elif inside and line.strip() and not line[0].isspace() and not re.fullmatch(r"-{3,}", line.strip()):
            head = line.split(" : ", 1)[0].removesuffix(":")
            names += [part.strip().lstrip("*") for part in head.split(",")]
    return names


def signature_parameters(func: Callable) -> list[str]:
    """The parameters a caller names: not ``self``, ``cls``, ``*args`` or ``**kwargs``."""
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        p.name
        for p in inspect.signature(func).parameters.values()
        if p.kind not in skip and p.name not in ("self", "cls")
    ]


CASES = sorted(PUBLIC)


@pytest.mark.parametrize("name", CASES)
def test_parameters_section_matches_the_signature(name):
    func = PUBLIC[name]
    given = signature_parameters(func)
    variadic = [
        p.name
        for p in inspect.signature(func).parameters.values()
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    documented = documented_parameters(func.__doc__)
    assert [n for n in given if n not in documented] == [], f"{name}: parameters not documented"
    assert [n for n in documented if n not in given + variadic] == [], f"{name}: documented names that are no parameter"
    assert len(documented) == len(set(documented)), f"{name}: a parameter documented twice"


def test_every_public_function_is_checked():
    """What the parametrization covers: the public functions, Reference's methods, sd.pl's plots."""
    expected = {
        "build_reference",
        "map_query",
        "per_cluster_mapping_metric",
        "Reference.from_arrays",
        "Reference.save",
        "Reference.to_anndata",
        "pl.reference",
        "pl.mapping",
        "datasets.pbmcs_small",
    }
    assert expected.issubset(PUBLIC), expected - set(PUBLIC)


@pytest.mark.parametrize(
    ("doc", "names"),
    [
        (
            """Summary.

            Parameters
            ----------
            theta, tau : float
                Two at once.
            data
                Plain.
            *args
                Variadic.

            Returns
            -------
            out
                Not a parameter.
            """,
            ["theta", "tau", "data", "args"],
        ),
        ("Summary without sections.", []),
    ],
)
def test_the_parameters_section_is_read_as_numpydoc(doc, names):
    assert documented_parameters(doc) == names
