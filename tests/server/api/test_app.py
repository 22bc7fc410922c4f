"""The routes beside generation: models, health, version and workers."""

from __future__ import annotations

import baton
from tests.server.api.conftest import ALIAS, MODEL


def test_models_lists_the_served_name(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == [ALIAS]
    assert models[0].model_extra["root"] == MODEL
    assert models[0].model_extra["max_model_len"] == server.cluster.max_model_len


def test_health_follows_the_cluster(server):
    r = server.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    server.cluster.healthy = (False, "no decode worker is ready")
    r = server.get("/health")
    assert r.status_code == 503 and r.json()["reason"] == "no decode worker is ready"


def test_version(server):
    assert server.get("/version").json() == {"version": baton.__version__}


def test_workers_lists_the_cluster_workers(server):
    r = server.get("/workers")
    assert r.status_code == 200 and r.json() == server.cluster.worker_list
    server.cluster.worker_list = []
    assert server.get("/workers").json() == []
