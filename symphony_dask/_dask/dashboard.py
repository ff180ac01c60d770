"""The Dask dashboard for the people who watch it.

A link printed only when it serves, and a cluster factory for JupyterLab's dask-labextension.

Behind JupyterHub the dashboard is reached through jupyter-server-proxy; dask's own convention
sets the link it reports (``cluster_configs/README.md``)::

    distributed:
      dashboard:
        link: "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status"
"""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger("symphony_dask")

#: Seconds to wait for the dashboard's status page.
FETCH_TIMEOUT_S = 5.0
#: What distributed serves in place of the dashboard when bokeh is missing.
NEEDS_BOKEH = "needs bokeh"


def served_dashboard_link(client: Any, *, timeout: float = FETCH_TIMEOUT_S) -> str | None:
    """The client's dashboard link if the scheduler serves a working dashboard, else ``None``.

    The status page is fetched from the scheduler itself (its host and dashboard port), so that
    a link through a proxy (JupyterHub's ``.../proxy/8787/status``) is checked too; the page that
    distributed shows when bokeh is missing counts as not served.
    """
    link = client.dashboard_link
    url = _direct_status_url(client)
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            page = response.read(1 << 20).decode(errors="replace")
    except OSError as err:
        logger.debug("the dashboard at %s does not answer: %s", url, err)
        return None
    if NEEDS_BOKEH in page:
        logger.debug("the dashboard at %s needs bokeh", url)
        return None
    return link


def _direct_status_url(client: Any) -> str | None:
    """``http://<scheduler host>:<dashboard port>/status``, or ``None`` without a dashboard."""
    info = client.scheduler_info(n_workers=0)
    port = (info.get("services") or {}).get("dashboard")
    if not port:
        return None
    host = urlsplit(info["address"].replace("tcp://", "http://", 1)).hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/status"


def cluster_from_file(path: str | Path) -> Any:
    """Start the cluster a file of ``cluster_configs/`` describes, scaled as it asks (SLURM jobs).

    This is a factory for JupyterLab's dask-labextension (its ``labextension.factory`` setting)::

        labextension:
          factory:
            module: symphony_dask
            class: cluster_from_file
            args: [/path/to/cluster_configs/slurm.yaml]
            kwargs: {}

    Parameters
    ----------
    path
        A cluster file (``cluster_configs/*.yaml``).

    Returns
    -------
    distributed.deploy.Cluster
        The started cluster; the extension's "Scale" and "Adaptive" buttons act on it.
    """
    from symphony_dask._dask.cluster import make_cluster

    cluster, jobs = make_cluster(path)
    if jobs:
        cluster.scale(jobs=jobs)
    return cluster
