"""CURVE on every ZeroMQ link of a real cluster: requests (and their KV handoffs) are served as
usual; a worker without the deployment keys, or with another pair, never gets in (its handshake
fails: it does not even know the router's public key). A client that knows that key but holds
another secret is refused by the authenticator: tests/server/wire/test_curve.py."""

from __future__ import annotations

import pytest

from baton.bench.cluster import Cluster
from baton.server.wire import curve
from tests.faults.conftest import random_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    good = tmp_path_factory.mktemp("deployment")
    other = tmp_path_factory.mktemp("intruder")
    return curve.generate_keys(good)[1], curve.generate_keys(other)[1]


@pytest.fixture(scope="module")
def cluster(keys, cut_model):
    with Cluster.running(
        {"p0": ("prefill",), "d0": ("decode",)},
        env={curve.ENV_SECRET_FILE: keys[0]},
        model=cut_model,
    ) as c:
        yield c


def test_a_secured_cluster_serves_and_hands_kv_over(cluster, reference):
    for name in ("router", "p0", "d0"):
        proc = cluster.router if name == "router" else cluster.workers[name]
        assert "ZeroMQ links: CURVE" in cluster.log(proc, tail=100_000), name
    prompt = random_prompt(90, 40)
    assert cluster.complete(prompt, 12) == reference(prompt, 12)
    # the decode worker generated after the first token: its KV came over the secured link
    assert cluster.worker_states()["d0"]["served"] == 1


@pytest.mark.parametrize("who", ["plain", "other-keys"])
def test_a_worker_without_the_deployment_keys_is_never_admitted(cluster, keys, who, reference):
    env = {curve.ENV_SECRET_FILE: "" if who == "plain" else keys[1]}
    name = f"intruder-{who}"
    cluster.add_worker(name, "decode", "--register-timeout", "3", wait=False, env=env)
    proc = cluster.workers[name]
    assert proc.wait(timeout=60) != 0  # gave up: the router never answered it
    assert "no answer from the router" in cluster.log(proc)
    assert name not in cluster.worker_states()
    prompt = random_prompt(91, 16)
    assert cluster.complete(prompt, 4) == reference(prompt, 4)  # the cluster is unharmed
