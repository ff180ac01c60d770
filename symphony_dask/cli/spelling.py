"""Options spelled as ``symphony-dask`` takes them, for the messages of the library's checks.

The library names a parameter through :func:`symphony_dask._io.validation.option`; the command line
installs :func:`flag` for the duration of a command (:func:`command_line_spelling`), so that the same
check says ``--no-normalize`` to a shell user and ``normalize=False`` to a Python user.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from symphony_dask._io.validation import spelled_by

#: Boolean keyword arguments whose command-line flag sets the value given here.
FLAG_OF = {
    "normalize": ("--no-normalize", False),
    "keep_embedding": ("--minimal", False),
    "overwrite": ("--overwrite", True),
    "neighbor_index": ("--no-neighbor-index", False),
    "umap": ("--no-umap", False),
}
#: Keyword arguments that the command line spells other than ``--name-with-dashes``.
RENAMED = {"batch_keys": "--batch-key", "n_hvg": "--n-hvg"}


def flag(name: str, value: object = ...) -> str:
    """The keyword argument ``name`` (set to ``value``, if given) as a command-line option.

    A boolean whose flag sets the other value reads "no --flag" (which ``pass_option`` says as "leave out
    --flag").
    """
    if name in FLAG_OF and isinstance(value, bool):
        spelled, sets = FLAG_OF[name]
        return spelled if value == sets else f"no {spelled}"
    spelled = RENAMED.get(name, "--" + name.replace("_", "-"))
    return spelled if value is ... else f"{spelled} {value}"


def command_line_spelling() -> AbstractContextManager[None]:
    """Inside this block, messages name options as ``symphony-dask`` takes them (``--no-normalize``)."""
    return spelled_by(flag)
