"""The public namespace: scanpy's habits (``sd.pl``, ``sd.datasets``), names resolved on first use,
and nothing but public names in ``dir(sd)``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import symphony_dask as sd


def test_dir_lists_public_names_and_modules_only():
    names = dir(sd)
    assert names == sorted([*sd.__all__, "__version__"])
    assert {"pl", "datasets", "build_reference", "map_query", "Reference", "load_reference"} <= set(names)
    assert not {"Any", "import_module", "version", "annotations", "TYPE_CHECKING"} & set(names)


@pytest.mark.slow
def test_pl_and_datasets_resolve_lazily():
    code = (
        "import sys, symphony_dask as sd\n"
        "assert 'symphony_dask.pl' not in sys.modules and 'anndata' not in sys.modules\n"
        "assert callable(sd.pl.reference) and callable(sd.pl.mapping)\n"
        "assert callable(sd.datasets.pbmcs_small)\n"
        "assert sd.pl is sys.modules['symphony_dask.pl']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
