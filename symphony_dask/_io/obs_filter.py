"""Cell filters over obs columns (``obs_filter=`` / ``--obs-filter``), in a small grammar that runs no code.

A filter is parsed with :mod:`ast` and evaluated here on the columns, never handed to
``DataFrame.eval`` or ``eval``: only column names, literals (numbers, quoted strings, ``True``,
``False``), comparisons (``== != < <= > >=``), ``in`` / ``not in`` a list, ``&`` ``|`` ``~`` (or
``and`` ``or`` ``not``, with pandas' precedence: below comparisons) and parentheses are taken.
Attributes, calls, ``@`` variables, indexing and arithmetic are refused with a message naming the
offending part. Column names with spaces are written in backticks, as pandas does.
"""

from __future__ import annotations

import ast
import logging
import operator
import re
from collections.abc import Callable

import numpy as np
import pandas as pd

from symphony_dask._io.validation import option

logger = logging.getLogger(__name__)

GRAMMAR = (
    "a filter may use obs column names (in `backticks` if they hold spaces), numbers, quoted strings, True "
    "and False, comparisons (== != < <= > >=), in / not in [a list], & | ~ (or and, or, not) and parentheses, "
    "e.g. \"donor != 'd7' & n_genes > 500\""
)

_COMPARE: dict[type, Callable] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_FLIPPED: dict[type, type] = {
    ast.Eq: ast.Eq,
    ast.NotEq: ast.NotEq,
    ast.Lt: ast.Gt,
    ast.LtE: ast.GtE,
    ast.Gt: ast.Lt,
    ast.GtE: ast.LtE,
}
_PLACEHOLDER = "__obs_column_{}__"


class _Refused(ValueError):
    """A part of the filter outside the grammar."""

    def __init__(self, part: str, why: str) -> None:
        super().__init__(f"{part!r} is not allowed ({why})")


def cells_where(obs: pd.DataFrame, expression: str) -> np.ndarray:
    """Boolean mask of the cells for which ``expression`` holds over the ``obs`` columns.

    Parameters
    ----------
    obs
        The cells' annotations.
    expression
        A filter in the grammar of this module, e.g. ``"donor != 'd7' & n_genes > 500"``.

    Returns
    -------
    numpy.ndarray
        One bool per cell.

    Raises
    ------
    ValueError
        For anything outside the grammar (naming the part), an unknown column (listing the columns),
        comparisons the column's values do not support, or a filter that keeps no cell.
    """
    flag = option("obs_filter")
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"{flag} must be a non-empty string; {GRAMMAR}")
    try:
        text, names = _rewrite(expression)
        tree = _parse(text, names)
        keep = _Evaluator(obs, text, names).mask(tree.body)
    except _Refused as err:
        raise ValueError(f"{flag} {expression!r}: {err}; {GRAMMAR}") from None
    except KeyError as err:
        columns = ", ".join(map(repr, obs.columns)) or "(none)"
        raise ValueError(
            f"{flag} {expression!r} names {err.args[0]!r}, which is not an obs column; the columns are: "
            f"{columns} (write names with spaces in backticks)"
        ) from None
    if not keep.any():
        raise ValueError(f"{flag} {expression!r} keeps none of the {len(obs)} cells")
    logger.info("%s %r keeps %d of %d cells", flag, expression, int(keep.sum()), len(obs))
    return keep


def _rewrite(expression: str) -> tuple[str, dict[str, str]]:
    """The filter rewritten for :mod:`ast`, and the column names of its placeholders.

    Outside string literals, backtick names become placeholders and ``& | ~`` are spelled ``and or not``
    (pandas' precedence).
    """
    out: list[str] = []
    names: dict[str, str] = {}
    i, n = 0, len(expression)
    while i < n:
        c = expression[i]
        if c in "'\"":
            j = i + 1
            while j < n and expression[j] != c:
                j += 2 if expression[j] == "\\" else 1
            if j >= n:
                raise _Refused(expression[i:], "a string without its closing quote")
            out.append(expression[i : j + 1])
            i = j + 1
        elif c == "`":
            j = expression.find("`", i + 1)
            if j < 0:
                raise _Refused(expression[i:], "a column name without its closing backtick")
            placeholder = _PLACEHOLDER.format(len(names))
            names[placeholder] = expression[i + 1 : j]
            out.append(placeholder)
            i = j + 1
        elif c == "@":
            raise _Refused(
                re.match(r"@[\w.]*", expression[i:]).group(),
                "'@' refers to Python variables, which a filter cannot reach",
            )
        else:
            out.append({"&": " and ", "|": " or ", "~": " not "}.get(c, c))
            i += 1
    return "".join(out).strip(), names


def _parse(text: str, names: dict[str, str]) -> ast.Expression:
    try:
        return ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise _Refused(_original(text.strip(), names), f"not a valid filter: {err.msg}") from None


def _original(part: str, names: dict[str, str]) -> str:
    """``part`` of the rewritten filter as the user wrote it (backtick names, ``& | ~``)."""
    for placeholder, name in names.items():
        part = part.replace(placeholder, f"`{name}`")
    return part


class _Evaluator:
    """Evaluates a parsed filter on ``obs``, node by node, refusing every node outside the grammar."""

    def __init__(self, obs: pd.DataFrame, text: str, names: dict[str, str]) -> None:
        self.obs = obs
        self.text = text
        self.names = names

    def part(self, node: ast.AST) -> str:
        return _original(ast.get_source_segment(self.text, node) or type(node).__name__, self.names)

    def mask(self, node: ast.AST) -> np.ndarray:
        """A bool per cell for a boolean part of the filter."""
        if isinstance(node, ast.BoolOp):
            masks = [self.mask(value) for value in node.values]
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            return combine.reduce(masks)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.mask(node.operand)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Name):
            column = self.column(node)
            if not (pd.api.types.is_bool_dtype(column.dtype)):
                raise _Refused(
                    self.part(node), f"the column holds {column.dtype} values, not True/False; compare it with a value"
                )
            return column.fillna(False).to_numpy(dtype=bool)
        raise _Refused(self.part(node), self.why(node))

    def compare(self, node: ast.Compare) -> np.ndarray:
        result = np.ones(len(self.obs), dtype=bool)
        left = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            result &= self.comparison(self.part(node), left, op, right)
            left = right
        return result

    def comparison(self, whole: str, left: ast.AST, op: ast.cmpop, right: ast.AST) -> np.ndarray:
        if isinstance(op, (ast.In, ast.NotIn)) or (
            isinstance(op, (ast.Eq, ast.NotEq)) and isinstance(right, (ast.List, ast.Tuple))
        ):
            if not isinstance(left, ast.Name):
                raise _Refused(self.part(left), "the left side of 'in' must be an obs column")
            values = self.values(right)
            keep = self.column(left).isin(values).to_numpy(dtype=bool)
            return ~keep if isinstance(op, (ast.NotIn, ast.NotEq)) else keep
        if isinstance(left, ast.Name) and isinstance(right, ast.Name):
            a, b = self.column(left), self.column(right)
        elif isinstance(left, ast.Name):
            a, b = self.column(left), self.value(right)
        elif isinstance(right, ast.Name):
            a, b, op = self.column(right), self.value(left), _FLIPPED[type(op)]()
        else:
            self.value(left), self.value(right)  # refuses what is not a literal, naming it
            raise _Refused(whole, "a comparison needs an obs column on one side")
        try:
            out = _COMPARE[type(op)](a, b)
        except TypeError as err:
            raise _Refused(whole, f"the values cannot be compared so: {err}") from None
        return pd.Series(out).fillna(False).to_numpy(dtype=bool)

    def column(self, node: ast.Name) -> pd.Series:
        name = self.names.get(node.id, node.id)
        if name not in self.obs.columns:
            raise KeyError(name)
        return self.obs[name]

    def value(self, node: ast.AST) -> object:
        """A literal: a number (possibly negative), a string, True, False or None."""
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
            return node.value
        if (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, (int, float))
            and not isinstance(node.operand.value, bool)
        ):
            return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
        raise _Refused(self.part(node), self.why(node))

    def values(self, node: ast.AST) -> list:
        if not isinstance(node, (ast.List, ast.Tuple)):
            raise _Refused(self.part(node), "'in' takes a list of values, e.g. donor in ['a', 'b']")
        return [self.value(item) for item in node.elts]

    @staticmethod
    def why(node: ast.AST) -> str:
        if isinstance(node, ast.Attribute):
            return "attributes and methods of columns are not part of a filter"
        if isinstance(node, ast.Call):
            return "calls are not part of a filter"
        if isinstance(node, ast.Subscript):
            return "indexing is not part of a filter"
        if isinstance(node, (ast.BinOp, ast.UnaryOp)):
            return "arithmetic is not part of a filter; compare columns with values"
        if isinstance(node, ast.Constant):
            return "a value alone is not a condition; compare a column with it"
        return f"{type(node).__name__} is not part of a filter"
