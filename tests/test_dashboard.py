"""The Dask dashboard works from the default install, behind JupyterHub's proxy convention too, and
JupyterLab's dask-labextension can start our cluster configs (issue #26, items 1 and 2)."""

from __future__ import annotations

import importlib
import urllib.request

import dask
import pytest
import yaml
from _helpers import CLUSTER_CONFIGS
from distributed import Client

from symphony_dask._dask.dashboard import NEEDS_BOKEH, served_dashboard_link

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def client(module_local_cluster):
    _, client = module_local_cluster(n_workers=1, processes=False)
    return client


def test_the_dashboard_serves_bokeh_pages(client):
    """The status page is the bokeh dashboard, not distributed's "Dask needs bokeh>=3.1.0" page."""
    with urllib.request.urlopen(client.dashboard_link, timeout=10) as response:
        assert response.status == 200
        page = response.read().decode()
    assert NEEDS_BOKEH not in page
    assert "Bokeh" in page or "bokeh" in page
    assert served_dashboard_link(client) == client.dashboard_link


def test_jupyterhub_proxy_link_convention(client, monkeypatch):
    """Behind JupyterHub, dask's link setting sends the browser through jupyter-server-proxy; the
    dashboard is still checked at the scheduler itself before the link is given."""
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    port = client.scheduler_info()["services"]["dashboard"]
    with dask.config.set({"distributed.dashboard.link": "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status"}):
        assert client.dashboard_link == f"/user/ada/proxy/{port}/status"
        assert served_dashboard_link(client) == f"/user/ada/proxy/{port}/status"


def test_no_link_when_nothing_serves(local_cluster):
    _, client = local_cluster(n_workers=0, processes=False, dashboard_address=None)
    assert served_dashboard_link(client) is None


def test_dask_labextension_factory_starts_a_cluster_config(tmp_path):
    """dask-labextension calls ``getattr(import_module(module), class)(*args, **kwargs)`` from its
    ``labextension.factory`` setting (documented in cluster_configs/README.md): it gets our cluster."""
    config = yaml.safe_load((CLUSTER_CONFIGS / "local.yaml").read_text())
    config["cluster"].update(n_workers=1, memory_limit="1GiB", dashboard_address=":0")
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(config))
    factory = {
        "module": "symphony_dask",
        "class": "cluster_from_file",
        "args": [str(tmp_path / "local.yaml")],
        "kwargs": {},
    }
    make = getattr(importlib.import_module(factory["module"]), factory["class"])
    with make(*factory["args"], **factory["kwargs"]) as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)
        assert len(client.scheduler_info()["workers"]) == 1
        assert served_dashboard_link(client) == cluster.dashboard_link
        cluster.scale(2)  # the extension's "Scale" button
        client.wait_for_workers(2, timeout=60)
