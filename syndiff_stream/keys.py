"""CURVE keys: encryption and client authentication for the publisher (CurveZMQ, via pyzmq).

`make_keys(folder, clients)` (the `syndiff-stream keys` command) writes ZeroMQ certificate files:

    server.key, server.key_secret   the publisher's pair: `run --curve-secret server.key_secret`
    authorized/<client>.key         public keys the publisher accepts: `run --curve-allow authorized`
    <client>.key_secret             each client's pair, for that client only (with server.key)

Secret files are written readable by their owner only. Masks describe patient video: on any
network beyond loopback, publish with CURVE.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER = "server"
AUTHORIZED = "authorized"


def make_keys(folder: str | Path, clients: tuple[str, ...] = ("client",), force: bool = False) -> list[Path]:
    """Server and client key pairs in `folder` (layout in the module docstring); the files written.
    Existing secret keys are kept unless `force`: replacing them locks out every client."""
    folder = Path(folder)
    for name in clients:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (SERVER, AUTHORIZED):
            raise ValueError(f"client name {name!r}: use letters, digits, '_', '-', '.' (not {SERVER!r})")
    names = [SERVER, *clients]
    existing = [folder / f"{n}.key_secret" for n in names if (folder / f"{n}.key_secret").exists()]
    if existing and not force:
        raise ValueError(f"{existing[0]} already exists: pass --force to replace the keys")
    (folder / AUTHORIZED).mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        public, secret = zmq.auth.create_certificates(folder, name)  # zmq.curve_keypair inside
        os.chmod(secret, 0o600)
        if name != SERVER:  # the publisher needs only the public half of a client's pair
            public = Path(shutil.move(public, folder / AUTHORIZED / f"{name}.key"))
        written += [Path(public), Path(secret)]
    return written


def load_pair(path: str | Path, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) keys from a certificate file; `secret` demands a .key_secret file."""
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable ZeroMQ certificate ({exc})") from None
    if secret and not secret_key:
        raise ValueError(f"{path}: has no secret key (pass the .key_secret file from syndiff-stream keys)")
    return public, secret_key


def server_cert(socket: zmq.Socket, secret_file: str | Path) -> None:
    """Make `socket` a CURVE server: every connection is encrypted with this key pair."""
    public, secret = load_pair(secret_file, secret=True)
    socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True


def client_cert(socket: zmq.Socket, secret_file: str | Path | None, server_file: str | Path | None) -> None:
    """Make `socket` a CURVE client of the server whose public certificate is `server_file`."""
    if not secret_file or not server_file:
        raise ValueError("CURVE needs both this client's .key_secret file and the server's .key file")
    public, secret = load_pair(secret_file, secret=True)
    socket.curve_secretkey, socket.curve_publickey = secret, public
    socket.curve_serverkey = load_pair(server_file, secret=False)[0]


def start_authenticator(context: zmq.Context, allow: str | Path | None) -> ThreadAuthenticator:
    """ZAP handler for `context`: only clients whose public keys are in `allow` may connect
    (`allow=None`: any client that knows the server's public key; encryption without a list)."""
    if allow is not None and not Path(allow).is_dir():
        raise ValueError(f"--curve-allow {allow}: not a folder of client .key files")
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=str(allow) if allow is not None else zmq.auth.CURVE_ALLOW_ANY)
    return auth
