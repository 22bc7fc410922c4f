"""Which routes ask for which key: /v1 the API key; /workers, /docs, /openapi.json and /metrics
the admin key (or the API key where none is set), /metrics open only when made public;
/health and /version never; keys from a flag, a file or the environment."""

from __future__ import annotations

import pytest

from baton.server.api.auth import AccessConfig, read_key
from tests.server.api.conftest import ALIAS, Server
from tests.server.api.test_errors import error_of

OPERATOR = ("/workers", "/docs", "/openapi.json", "/redoc", "/metrics")


def bearer(key: str) -> dict:
    return {"headers": {"Authorization": f"Bearer {key}"}}


@pytest.fixture
def serve(cluster):
    servers = []

    def start(**access) -> Server:
        s = Server(cluster, api_key=access.get("api_key"), access=AccessConfig(**access))
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def test_with_an_api_key_operator_routes_refuse_without_it_and_health_never(serve):
    s = serve(api_key="k1")
    for path in OPERATOR:
        err = error_of(s.get(path), 401)
        assert err["code"] == "invalid_api_key", path
        error_of(s.get(path, **bearer("wrong")), 401)
        assert s.get(path, **bearer("k1")).status_code == 200, path
    assert s.get("/workers", **bearer("k1")).json()[0]["id"] == "p0"
    assert "baton:" in s.get("/metrics", **bearer("k1")).text
    for path in ("/health", "/version"):
        assert s.get(path).status_code == 200, path
    error_of(s.get("/nothing"), 401)  # what is not listed is guarded, not revealed as a 404


def test_an_admin_key_guards_the_operator_routes_and_only_them(serve):
    s = serve(api_key="user", admin_key="ops")
    for path in OPERATOR:
        error_of(s.get(path, **bearer("user")), 401)  # the users' key is not the operators'
        assert s.get(path, **bearer("ops")).status_code == 200, path
    error_of(s.get("/v1/models", **bearer("ops")), 401)
    assert s.get("/v1/models", **bearer("user")).json()["data"][0]["id"] == ALIAS
    assert s.get("/health").status_code == 200
    # an admin key alone leaves /v1 open
    s2 = serve(admin_key="ops")
    assert s2.get("/v1/models").status_code == 200
    error_of(s2.get("/workers"), 401)


def test_metrics_public_opens_metrics_alone(serve):
    s = serve(api_key="k1", metrics_public=True)
    assert s.get("/metrics").status_code == 200
    for path in ("/workers", "/openapi.json"):
        error_of(s.get(path), 401)
    error_of(s.get("/v1/models"), 401)


def test_no_key_leaves_everything_open(serve):
    s = serve()
    for path in (*OPERATOR, "/v1/models", "/health"):
        assert s.get(path).status_code == 200, path


def test_keys_come_from_the_flag_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_API_KEY", "from-env")
    assert read_key(None, None, "BATON_API_KEY", "--api-key") == "from-env"
    assert read_key("from-flag", None, "BATON_API_KEY", "--api-key") == "from-flag"
    f = tmp_path / "key"
    f.write_text("from-file\n")
    assert read_key(None, str(f), "BATON_API_KEY", "--api-key") == "from-file"
    with pytest.raises(ValueError, match="not both"):
        read_key("x", str(f), "BATON_API_KEY", "--api-key")
    f.write_text("\n")
    with pytest.raises(ValueError, match="--api-key-file: .* holds no key"):
        read_key(None, str(f), "BATON_API_KEY", "--api-key")
    with pytest.raises(ValueError, match="cannot read"):
        read_key(None, str(tmp_path / "missing"), "BATON_API_KEY", "--api-key")
    monkeypatch.delenv("BATON_API_KEY")
    assert read_key(None, None, "BATON_API_KEY", "--api-key") is None


def test_keys_stay_out_of_the_config_repr():
    text = repr(AccessConfig(api_key="s3cret", admin_key="t0p"))
    assert "s3cret" not in text and "t0p" not in text
