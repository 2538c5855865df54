"""``fromface serve``: the REST service (FastAPI + uvicorn), on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse

from fromface.cli.verify import add_recognizer_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the REST service (POST /verify, /identify, /enroll; GET /health)",
                       description="Serve verification, identification and enrolment over HTTP. Binds to 127.0.0.1 "
                       "by default; use --host 0.0.0.0 only behind something that authenticates requests.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default=None, help="gallery database for /identify and /enroll")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted file (default 10 MB)")
    p.add_argument("--max-pixels", type=int, default=25_000_000, help="largest accepted image (default 25 MP)")
    add_recognizer_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fromface.errors import ConfigError

    try:
        import uvicorn
    except ImportError:
        raise ConfigError("the REST service needs uvicorn: pip install 'fromface[serve]'") from None
    from fromface.cli.verify import recognizer_from_args
    from fromface.serve.app import create_app

    if args.db and args.model is None:
        from fromface.inference.gallery import Gallery

        with Gallery(args.db) as g:
            meta = g.meta()
            args.model = meta.get("source") or meta.get("model")
    recognizer = recognizer_from_args(args)
    app = create_app(recognizer, args.db, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                     max_pixels=args.max_pixels)
    print(f"fromface serving {recognizer.model_name} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
