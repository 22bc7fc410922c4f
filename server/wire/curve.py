"""Optional CURVE encryption and authentication of every ZeroMQ link, with one deployment key pair.

A deployment shares ONE CURVE key pair, like a cluster secret; every Baton process loads it. Sockets
that bind (the router's control socket, a decode worker's KV socket) are CURVE servers with its
secret key; sockets that connect are CURVE clients that present the same pair and expect the same
public key from the server. A ZAP authenticator on each process's context admits only clients whose
public key is the deployment's (or one from an allow directory): a peer without the secret, or a
plain one, never gets a message through. With no keys configured everything stays plain.

Order matters in each process: `start_authenticator` on the context, then `secure_server` or
`secure_client` on each socket, then bind or connect; stop the authenticator before `ctx.term()`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger(__name__)

ENV_PUBLIC = "BATON_CURVE_PUBLIC_KEY"
ENV_SECRET = "BATON_CURVE_SECRET_KEY"
ENV_SECRET_FILE = "BATON_CURVE_SECRET_KEY_FILE"
ENV_ALLOW_DIR = "BATON_CURVE_ALLOW_DIR"
KEY_NAME = "baton"  # files: baton.key (public), baton.key_secret (secret, mode 0600)
ZAP_DOMAIN = b"baton"
_Z85 = frozenset(z85.Z85CHARS)


@dataclasses.dataclass(frozen=True)
class CurveKeys:
    """The deployment's z85-encoded key pair, plus extra client public keys to admit."""

    public: bytes
    secret: bytes = dataclasses.field(repr=False)
    allowed: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _check_key(self.public, "public key")
        _check_key(self.secret, "secret key")
        for i, key in enumerate(self.allowed):
            _check_key(key, f"allowed key #{i}")
        if zmq.curve_public(self.secret) != self.public:
            raise ValueError("CURVE public key does not belong to the secret key")


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, bytes):
        raise ValueError(f"CURVE {what} must be z85-encoded bytes, not {type(key).__name__}")
    if len(key) != 40:
        raise ValueError(f"CURVE {what} must be 40 z85 characters, got {len(key)}")
    if not set(key) <= _Z85:
        raise ValueError(f"CURVE {what} has characters outside the z85 alphabet")
    try:
        z85.decode(key)
    except Exception:  # a 5-character group above 2**32 - 1
        raise ValueError(f"CURVE {what} is not valid z85") from None


def generate_keys(directory: str | os.PathLike) -> tuple[str, str]:
    """Write a new pair as `baton.key` and `baton.key_secret` (0600); never overwrites a file.

    The files are in the format of `zmq.auth.create_certificates`, but the secret one is created
    with mode 0600 from the start rather than chmod-ed after being written.
    """
    os.makedirs(directory, exist_ok=True)
    public_path = os.path.join(directory, f"{KEY_NAME}.key")
    secret_path = os.path.join(directory, f"{KEY_NAME}.key_secret")
    for path in (public_path, secret_path):
        if os.path.lexists(path):
            raise FileExistsError(f"refusing to overwrite {path}")
    public, secret = zmq.curve_keypair()
    _write_new(secret_path, 0o600, _certificate(public, secret))
    try:
        _write_new(public_path, 0o644, _certificate(public, None))
    except BaseException:
        os.unlink(secret_path)
        raise
    return public_path, secret_path


def _certificate(public: bytes, secret: bytes | None) -> str:
    kind = "**Secret** Certificate" if secret else "Public Certificate"
    lines = [f"#   ZeroMQ CURVE {kind} (Baton deployment key)", "", "metadata", "curve"]
    lines.append(f'    public-key = "{public.decode()}"')
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_new(path: str, mode: int, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)


def load_keys(
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] = os.environ,
    allow_dir: str | os.PathLike | None = None,
) -> CurveKeys | None:
    """The deployment keys, or None when CURVE is off.

    Sources, first match wins: `path` (a secret certificate file), $BATON_CURVE_SECRET_KEY_FILE,
    or $BATON_CURVE_PUBLIC_KEY with $BATON_CURVE_SECRET_KEY. Extra client public keys come from
    the `*.key` files in `allow_dir` or $BATON_CURVE_ALLOW_DIR. Half a configuration is an error.
    """
    path = path or env.get(ENV_SECRET_FILE) or None
    pair = env.get(ENV_PUBLIC) or None, env.get(ENV_SECRET) or None
    if env.get(ENV_SECRET_FILE) and any(pair):
        raise ValueError(f"set either {ENV_SECRET_FILE} or {ENV_PUBLIC}/{ENV_SECRET}, not both")
    if path is not None:
        public, secret = _load_secret_file(path)
    elif all(pair):
        public, secret = _env_key(ENV_PUBLIC, pair[0]), _env_key(ENV_SECRET, pair[1])
    elif any(pair):
        missing = ENV_SECRET if pair[0] else ENV_PUBLIC
        raise ValueError(f"CURVE is half-configured: {missing} is not set")
    else:
        public = secret = None
    allow_dir = allow_dir or env.get(ENV_ALLOW_DIR) or None
    if public is None:
        if allow_dir is not None:
            raise ValueError(f"a CURVE allow directory ({allow_dir}) needs a key pair too")
        return None
    return CurveKeys(public, secret, _load_allowed(allow_dir) if allow_dir else ())


def _env_key(name: str, value: str) -> bytes:
    try:
        return value.strip().encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{name} has characters outside the z85 alphabet") from None


def _load_secret_file(path: str | os.PathLike) -> tuple[bytes, bytes]:
    if not os.path.isfile(path):
        raise ValueError(f"CURVE secret key file not found: {path}")
    if os.stat(path).st_mode & 0o077:
        log.warning("CURVE secret key file %s is readable by others; chmod 600 it", path)
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key (is it the public .key file?)")
    return public, secret


def _load_allowed(directory: str | os.PathLike) -> tuple[bytes, ...]:
    if not os.path.isdir(directory):
        raise ValueError(f"CURVE allow directory not found: {directory}")
    return tuple(sorted(zmq.auth.load_certificates(directory)))


def secure_server(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    """Make `sock` a CURVE server with the deployment key; a no-op when keys is None.

    Call before `bind`. NOTE: the socket is also told to refuse every client when no ZAP
    handler runs on its context (where libzmq allows it), so a forgotten authenticator fails
    closed instead of admitting anyone who knows the public key.
    """
    if keys is None:
        return
    _check_unused(sock)
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.zap_domain = ZAP_DOMAIN
    # NOTE: only together with a non-empty ZAP domain; on libzmq 4.3 enforcing with an empty
    # domain skips ZAP altogether and admits any CURVE client.
    enforce = getattr(zmq, "ZAP_ENFORCE_DOMAIN", None)
    if enforce is not None:
        try:
            sock.setsockopt(enforce, 1)
        except zmq.ZMQError:  # a libzmq built without the draft option
            log.debug("ZAP_ENFORCE_DOMAIN unsupported; relying on the authenticator alone")
    sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    """Make `sock` a CURVE client presenting the deployment pair; a no-op when keys is None.

    Call before `connect`.
    """
    if keys is None:
        return
    _check_unused(sock)
    sock.curve_serverkey = keys.public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


def _check_unused(sock: zmq.Socket) -> None:
    # security options apply to connections made after they are set; earlier ones stay plain
    if sock.getsockopt(zmq.LAST_ENDPOINT):
        raise RuntimeError("set CURVE options before the socket binds or connects")


class Authenticator(ThreadAuthenticator):
    """The ZAP handler of one context, in a thread: admits the allowed CURVE keys only."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys) -> None:
        # NOTE: a sync shadow of the context, so an asyncio one works too; ZAP is reached over
        # inproc, which is shared by every object wrapping the same libzmq context.
        super().__init__(zmq.Context.shadow(ctx.underlying), log=log)
        # NOTE: not `_allowed`: the base class keeps its IP allow list there
        self._admitted = frozenset((keys.public, *keys.allowed))
        self._zap_peer = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # frames: version, request id, domain, address, identity, mechanism, credentials...
        self._zap_peer = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """The credentials provider for `configure_curve_callback`: `key` is z85."""
        if key in self._admitted:
            return True
        log.warning("refused CURVE peer %s: unknown public key %s", self._zap_peer, key.decode())
        return False


def start_authenticator(ctx: zmq.Context, keys: CurveKeys | None) -> Authenticator | None:
    """Start the ZAP handler for `ctx` (sync or asyncio), or return None when keys is None.

    One per context, before any CURVE server binds; `stop()` it before `ctx.term()`, which would
    otherwise wait forever on the handler's socket.
    """
    if keys is None:
        return None
    auth = Authenticator(ctx, keys)
    auth.configure_curve_callback(ZAP_DOMAIN.decode(), auth)
    auth.start()
    return auth
