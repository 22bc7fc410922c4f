"""CURVE over loopback: the deployment pair talks both ways, encrypted; other keys, plain peers and
impostors get nothing through; keys load from files and the environment, or CURVE stays off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import shlex
import socket
import stat
import threading
import time

import pytest
import zmq
import zmq.asyncio
import zmq.auth

from baton.server.cli import main
from baton.server.wire import curve
from baton.server.wire.curve import CurveKeys

REFUSED_MS = 300  # how long a refused message is waited for
DELIVERED_MS = 5000
CONTEXTS = [zmq.Context, zmq.asyncio.Context]


def new_keys() -> CurveKeys:
    return CurveKeys(*zmq.curve_keypair())


class Node:
    """One process's context, its authenticator and its sockets, torn down in that order."""

    def __init__(self, keys: CurveKeys | None, ctx_class=zmq.Context):
        self.keys = keys
        self.ctx = ctx_class()
        self.auth = curve.start_authenticator(self.ctx, keys)
        self.sockets: list[zmq.Socket] = []  # NOTE: the context holds its sockets only weakly

    def socket(self, kind: int) -> zmq.Socket:
        # a sync socket even on an asyncio context: ZAP belongs to the context, not the socket
        self.sockets.append(self.ctx.socket(kind, socket_class=zmq.Socket))
        self.sockets[-1].linger = 0
        return self.sockets[-1]

    def server(self) -> tuple[zmq.Socket, int]:
        sock = self.socket(zmq.ROUTER)
        curve.secure_server(sock, self.keys)
        return sock, sock.bind_to_random_port("tcp://127.0.0.1")

    def client(self, port: int, **options) -> zmq.Socket:
        """A DEALER secured with this node's keys, or with raw CURVE `options` when given."""
        sock = self.socket(zmq.DEALER)
        if options:
            for name, value in options.items():
                setattr(sock, name, value)
        else:
            curve.secure_client(sock, self.keys)
        sock.connect(f"tcp://127.0.0.1:{port}")
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


@pytest.fixture
def nodes():
    threads = set(threading.enumerate())
    made: list[Node] = []

    def make(keys: CurveKeys | None, ctx_class=zmq.Context) -> Node:
        made.append(Node(keys, ctx_class))
        return made[-1]

    yield make
    for node in made:
        node.close()
    assert set(threading.enumerate()) <= threads, "an authenticator thread outlived its test"


def round_trip(server: zmq.Socket, client: zmq.Socket, body: bytes = b"ping") -> None:
    client.send(body)
    assert server.poll(DELIVERED_MS), "the server never got the client's message"
    ident, got = server.recv_multipart()
    assert got == body
    server.send_multipart([ident, b"pong"])
    assert client.poll(DELIVERED_MS), "the client never got the reply"
    assert client.recv() == b"pong"


def assert_refused(server: zmq.Socket, client: zmq.Socket, admitted: zmq.Socket | None) -> None:
    """`client` gets nothing through to `server`, while `admitted`, when given, still does."""
    # NOTE: never blocking: once its handshake has failed, a DEALER has no peer to queue for and
    # a blocking send would wait forever (seen on a loaded 2-core host).
    with contextlib.suppress(zmq.Again):
        client.send(b"let me in", zmq.NOBLOCK)
    assert server.poll(REFUSED_MS) == 0
    if admitted is not None:
        round_trip(server, admitted)


# ---- links ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ctx_class", CONTEXTS)
def test_deployment_pair_talks_both_ways(nodes, ctx_class):
    keys = new_keys()
    server, port = nodes(keys, ctx_class).server()
    client = nodes(keys).client(port)
    round_trip(server, client)
    assert server.mechanism == client.mechanism == zmq.CURVE
    assert server.curve_server and not client.curve_server


def test_asyncio_router_and_dealer_talk_both_ways():
    keys = new_keys()

    async def run():
        ctx = zmq.asyncio.Context()
        auth = curve.start_authenticator(ctx, keys)
        server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        try:
            curve.secure_server(server, keys)
            curve.secure_client(client, keys)
            client.connect(f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}")
            await client.send(b"ping")
            ident, body = await asyncio.wait_for(server.recv_multipart(), DELIVERED_MS / 1000)
            await server.send_multipart([ident, body + b"!"])
            assert await asyncio.wait_for(client.recv(), DELIVERED_MS / 1000) == b"ping!"
        finally:
            server.close(linger=0)
            client.close(linger=0)
            auth.stop()
            ctx.term()

    asyncio.run(run())


@pytest.mark.parametrize("ctx_class", CONTEXTS)
def test_client_with_another_pair_is_refused_and_logged(nodes, ctx_class, caplog):
    keys, other = new_keys(), new_keys()
    server, port = nodes(keys, ctx_class).server()
    client = nodes(None).client(
        port,
        curve_serverkey=keys.public,
        curve_publickey=other.public,
        curve_secretkey=other.secret,
    )
    expected = f"refused CURVE peer 127.0.0.1: unknown public key {other.public.decode()}"
    with caplog.at_level(logging.WARNING, logger=curve.__name__):
        assert_refused(server, client, nodes(keys).client(port))
        deadline = time.monotonic() + DELIVERED_MS / 1000  # logged by the authenticator thread
        while expected not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert expected in caplog.text


@pytest.mark.parametrize("ctx_class", CONTEXTS)
def test_plain_client_is_refused(nodes, ctx_class):
    keys = new_keys()
    server, port = nodes(keys, ctx_class).server()
    assert_refused(server, nodes(None).client(port), nodes(keys).client(port))


def test_impostor_with_the_public_key_but_another_secret_is_refused(nodes):
    keys, other = new_keys(), new_keys()
    server, port = nodes(keys).server()
    client = nodes(None).client(
        port, curve_serverkey=keys.public, curve_publickey=keys.public, curve_secretkey=other.secret
    )
    assert_refused(server, client, nodes(keys).client(port))


def test_keys_from_the_allow_list_are_admitted(nodes):
    guest = new_keys()
    keys = CurveKeys(*zmq.curve_keypair(), allowed=(guest.public,))
    server, port = nodes(keys).server()
    client = nodes(None).client(
        port,
        curve_serverkey=keys.public,
        curve_publickey=guest.public,
        curve_secretkey=guest.secret,
    )
    round_trip(server, client)


def test_server_without_authenticator_fails_closed(nodes):
    keys = new_keys()
    server = nodes(None).socket(zmq.ROUTER)
    curve.secure_server(server, keys)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    assert_refused(server, nodes(keys).client(port), None)


def test_without_keys_sockets_stay_plain_and_talk(nodes):
    node = nodes(None)
    assert node.auth is None
    server, port = node.server()
    client = nodes(None).client(port)
    round_trip(server, client)
    assert server.mechanism == client.mechanism == zmq.NULL


def test_options_after_bind_or_connect_are_an_error(nodes):
    keys = new_keys()
    server, port = nodes(None).server()
    client = nodes(None).client(port)
    with pytest.raises(RuntimeError, match="before the socket binds or connects"):
        curve.secure_server(server, keys)
    with pytest.raises(RuntimeError, match="before the socket binds or connects"):
        curve.secure_client(client, keys)


class Tap:
    """A loopback TCP forwarder for one connection that keeps a copy of every byte it carries."""

    def __init__(self, target_port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(DELIVERED_MS / 1000)
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.seen = bytearray()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._forward, daemon=True)
        self.thread.start()

    def _forward(self) -> None:
        a, _ = self.listener.accept()
        b = socket.create_connection(("127.0.0.1", self.target_port))
        with a, b, selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while not self.done.is_set():
                for key, _ in sel.select(0.05):
                    data = key.fileobj.recv(1 << 16)
                    if not data:
                        return
                    self.seen += data
                    key.data.sendall(data)

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        self.listener.close()


@pytest.mark.parametrize("secured", [True, False])
def test_traffic_is_encrypted_on_the_wire(nodes, secured):
    keys = new_keys() if secured else None
    server, port = nodes(keys).server()
    tap = Tap(port)
    try:
        secret_text = b"the quick brown fox carries KV blocks"
        round_trip(server, nodes(keys).client(tap.port), secret_text)
    finally:
        tap.close()
    assert (b"CURVE" if secured else b"NULL") in tap.seen  # the greeting names the mechanism
    assert (secret_text in tap.seen) is not secured
    assert (b"pong" in tap.seen) is not secured


# ---- keys ----------------------------------------------------------------------------------


def test_keys_are_validated():
    public, secret = zmq.curve_keypair()
    CurveKeys(public, secret)
    with pytest.raises(ValueError, match="public key must be 40 z85 characters, got 39"):
        CurveKeys(public[:-1], secret)
    with pytest.raises(ValueError, match="secret key has characters outside the z85 alphabet"):
        CurveKeys(public, secret[:-1] + b"~")
    with pytest.raises(ValueError, match="secret key must be z85-encoded bytes, not str"):
        CurveKeys(public, secret.decode())
    with pytest.raises(ValueError, match="does not belong to the secret key"):
        CurveKeys(zmq.curve_keypair()[0], secret)
    with pytest.raises(ValueError, match="allowed key #1 must be 40"):
        CurveKeys(public, secret, allowed=(public, b"short"))
    with pytest.raises(ValueError, match="public key is not valid z85"):
        CurveKeys(b"%" * 40, secret)  # every character is z85, but 85**5 - 1 overflows 32 bits
    assert secret.decode() not in repr(CurveKeys(public, secret))


def test_generated_files_load_and_the_secret_is_private(tmp_path):
    public_path, secret_path = curve.generate_keys(tmp_path / "new")
    assert os.path.basename(public_path) == "baton.key"
    assert os.path.basename(secret_path) == "baton.key_secret"
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    public, secret = zmq.auth.load_certificate(secret_path)
    assert zmq.auth.load_certificate(public_path) == (public, None)
    assert curve.load_keys(secret_path, env={}) == CurveKeys(public, secret)


def test_a_secret_file_others_can_read_is_loaded_with_a_warning(tmp_path, caplog):
    _, secret_path = curve.generate_keys(tmp_path)
    os.chmod(secret_path, 0o644)
    with caplog.at_level(logging.WARNING, logger=curve.__name__):
        assert curve.load_keys(secret_path, env={}) is not None
    assert "readable by others" in caplog.text


@pytest.mark.parametrize("existing", ["baton.key", "baton.key_secret"])
def test_generate_refuses_to_overwrite(tmp_path, existing):
    (tmp_path / existing).write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        curve.generate_keys(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [existing]
    assert (tmp_path / existing).read_text() == "keep me"


def test_keys_load_from_the_environment(tmp_path):
    _, secret_path = curve.generate_keys(tmp_path)
    keys = curve.load_keys(secret_path, env={})
    pair = {curve.ENV_PUBLIC: keys.public.decode(), curve.ENV_SECRET: keys.secret.decode() + "\n"}
    assert curve.load_keys(env=pair) == keys
    assert curve.load_keys(env={curve.ENV_SECRET_FILE: secret_path}) == keys
    assert curve.load_keys(env={}) is None
    assert curve.load_keys(env={curve.ENV_PUBLIC: "", curve.ENV_SECRET: ""}) is None
    assert curve.load_keys(secret_path, env={curve.ENV_PUBLIC: "ignored"}) == keys


def test_allow_directory_adds_client_keys(tmp_path):
    _, secret_path = curve.generate_keys(tmp_path / "deploy")
    allow = tmp_path / "allow"
    allow.mkdir()
    guests = []
    for name in ("a", "b"):  # public certificates as zmq.auth writes them; only *.key is read
        public_path, guest_secret_path = zmq.auth.create_certificates(allow, name)
        os.remove(guest_secret_path)
        guests.append(zmq.auth.load_certificate(public_path)[0])
    keys = curve.load_keys(secret_path, env={}, allow_dir=allow)
    assert keys.allowed == tuple(sorted(guests))
    env = {curve.ENV_SECRET_FILE: secret_path, curve.ENV_ALLOW_DIR: str(allow)}
    assert curve.load_keys(env=env) == keys


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({curve.ENV_PUBLIC: "x"}, "half-configured: BATON_CURVE_SECRET_KEY is not set"),
        ({curve.ENV_SECRET: "x"}, "half-configured: BATON_CURVE_PUBLIC_KEY is not set"),
        ({curve.ENV_ALLOW_DIR: "/nonexistent"}, "allow directory .* needs a key pair"),
        ({curve.ENV_SECRET_FILE: "/nonexistent"}, "secret key file not found"),
        ({curve.ENV_SECRET_FILE: "f", curve.ENV_SECRET: "x"}, "not both"),
        ({curve.ENV_PUBLIC: "é" * 40, curve.ENV_SECRET: "x"}, "outside the z85 alphabet"),
    ],
)
def test_misconfiguration_is_a_clear_error(env, message):
    with pytest.raises(ValueError, match=message):
        curve.load_keys(env=env)


def test_a_public_certificate_or_a_mismatched_pair_is_an_error(tmp_path):
    public_path, secret_path = curve.generate_keys(tmp_path)
    with pytest.raises(ValueError, match="holds no secret key"):
        curve.load_keys(public_path, env={})
    secret = curve.load_keys(secret_path, env={}).secret.decode()
    env = {curve.ENV_PUBLIC: new_keys().public.decode(), curve.ENV_SECRET: secret}
    with pytest.raises(ValueError, match="does not belong"):
        curve.load_keys(env=env)


# ---- command line --------------------------------------------------------------------------


def test_cli_writes_keys_once(tmp_path, capsys):
    assert main(["keys", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    keys = curve.load_keys(tmp_path / "baton.key_secret", env={})
    assert f"{curve.ENV_SECRET_FILE}={shlex.quote(str(tmp_path / 'baton.key_secret'))}" in out
    assert f"{curve.ENV_PUBLIC}='{keys.public.decode()}'" in out  # z85 needs shell quoting
    assert keys.secret.decode() not in out
    assert main(["keys", str(tmp_path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert curve.load_keys(tmp_path / "baton.key_secret", env={}) == keys
