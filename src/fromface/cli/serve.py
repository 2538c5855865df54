"""``fromface serve``: the REST service (FastAPI + uvicorn) and its web page, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import os
import socket

from fromface.cli.verify import add_recognizer_args
from fromface.errors import ConfigError

TOKEN_ENV = "FROMFACE_TOKEN"


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {port}")
    return port


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST service (POST /verify, /identify, /enroll; GET /health) and "
                       "its web page (GET /)",
                       description="Serve verification, identification and enrolment over HTTP, with a web page for "
                       "them at / (open the address it prints in a browser). Binds to 127.0.0.1 "
                       "by default. Before exposing it (--host 0.0.0.0, or behind a reverse proxy), require a token "
                       f"with --token-file or ${TOKEN_ENV}; see docs/security.md. SIGTERM and Ctrl-C shut it down "
                       "gracefully: requests in flight finish and the gallery file is left complete.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000)")
    p.add_argument("--db", default=None,
                   help="the gallery for /identify and /enroll (a path or URL, as for `fromface enroll`)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted file (default 10 MB)")
    p.add_argument("--max-pixels", type=int, default=25_000_000, help="largest accepted image (default 25 MP)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help=f"file holding the token every route but /health requires as 'Authorization: Bearer "
                   f"TOKEN' (or set ${TOKEN_ENV}); keep the file private")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="web origin (e.g. https://app.example.org) whose pages may call the service from a browser; "
                   "repeatable. Other cross-origin browser requests are refused")
    add_recognizer_args(p)
    p.set_defaults(func=run)


def read_token(path: str | None) -> str | None:
    """The service token from ``--token-file`` (first line, stripped) or the environment; None when neither."""

    if path is None:
        token = os.environ.get(TOKEN_ENV, "").strip()
        return token or None
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the token file ({exc})") from None
    token = (text.strip().splitlines() or [""])[0].strip()
    if len(token) < 16:
        raise ConfigError(f"{path}: the token must be at least 16 characters (e.g. `python -c \"import secrets; "
                          "print(secrets.token_urlsafe(32))\" > FILE`)")
    return token


def bind(host: str, port: int):
    """A listening socket on host:port, made before anything is printed: a port in use is a clear error."""

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server using "
                          "that port? Choose another with --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def page_url(host: str, port: int) -> str:
    """The web page's address to open in a browser on this machine: a wildcard address (which a browser cannot open)
    becomes the loopback address, and an IPv6 host goes in brackets."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def run(args: argparse.Namespace) -> int:

    try:
        import uvicorn
    except ImportError:
        raise ConfigError("the REST service needs uvicorn: pip install 'fromface[serve]'") from None
    from fromface.cli.verify import recognizer_for_gallery, recognizer_from_args
    from fromface.serve.app import create_app

    token = read_token(args.token_file)
    sock = bind(args.host, args.port)  # first: a port in use fails before the model is loaded
    try:
        if args.db:
            from fromface.inference.gallery import Gallery

            with Gallery(args.db) as g:
                recognizer_for_gallery(args, g)
                recognizer = g.recognizer
        else:
            recognizer = recognizer_from_args(args)
        app = create_app(recognizer, args.db, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                         max_pixels=args.max_pixels, token=token, allow_origins=tuple(args.allow_origin))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        auth = "token required" if token else "no token: anyone who can reach the port can use it"
        print(f"fromface serving {recognizer.model_name} on http://{args.host}:{args.port} ({auth}); web page: "
              f"{page_url(args.host, args.port)}", flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
