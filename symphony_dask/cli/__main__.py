"""``python -m symphony_dask.cli``: the ``symphony-dask`` command."""

import sys

from symphony_dask.cli.main import main

sys.exit(main())
