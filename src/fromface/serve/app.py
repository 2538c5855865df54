"""The REST app: POST /verify, /identify, /enroll and GET /health, with upload and pixel limits and JSON errors, and
the web page over them at GET / (its files under /static/).

Every error is JSON ``{"error": <kind>, "detail": <message>}``: 400 for unreadable images and bad requests, 401 for
a missing or wrong token, 403 for a cross-origin browser request from an origin not allowed, 404 when no gallery is
configured, 409 for a name that is already enrolled (send ``mode=add`` to add to it), 413 for a body over the limit
(counted while it streams in, whatever the transfer encoding), 422 when no (or more than one allowed) face is found.
Handlers are plain functions, so FastAPI runs them in its thread pool; the model and gallery are thread-safe.
/verify and /identify take ``show=true`` to add each face's ``panel``: the aligned crop with the occlusion heat map and
predicted pattern drawn over it (the ``--show`` picture's face panel), as a PNG data URL.
See docs/security.md for what the service trusts and how to run it behind a reverse proxy.
"""

import base64
import contextlib
import hmac
import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fromface.data.images import load_image
from fromface.errors import AlreadyEnrolledError, ConfigError, DataError, FromfaceError, ImageError, NoFaceError
from fromface.inference.gallery import Gallery, check_name, image_digest

# FastAPI and Starlette are the optional `serve` extra: imported inside the functions that build the app, so that
# without them `fromface serve` says what to install in one line.

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # per file
MAX_PIXELS = 25_000_000  # per image
MAX_FILES = 20  # per enrol request
MAX_TOP_K = 100
#: Routes answered without a token: /health (load balancers and monitors probe it; it reveals no paths) and the web
#: page with its static files, which hold no data -- the page asks for the token and sends it with every API call.
OPEN_ROUTES = ("/health", "/")
OPEN_PREFIXES = ("/static/",)
#: The web page's files (plain HTML, CSS and JavaScript: no build step, nothing fetched from elsewhere).
STATIC = Path(__file__).with_name("static")
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8"}
#: The page loads only its own files and talks only to this service; no other site may frame it.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache"}


class UploadTooLarge(FromfaceError):
    """An uploaded file, or the whole request, is over the size limit."""


_STATUS = {AlreadyEnrolledError: 409, ImageError: 400, DataError: 400, ConfigError: 400, NoFaceError: 422,
           UploadTooLarge: 413}


def _status_of(exc: FromfaceError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 422  # e.g. ManyFacesError


def create_app(recognizer: Any, gallery_path: str | os.PathLike | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS, max_files: int = MAX_FILES,
               token: str | None = None, allow_origins: tuple[str, ...] = ()):
    """Build the FastAPI app around one :class:`FaceRecognizer` and, optionally, a gallery file.

    ``token``: every route but /health needs ``Authorization: Bearer <token>``. ``allow_origins``: web origins
    (``https://app.example.org``) whose pages may call the service from a browser; any other cross-origin browser
    request is refused, so a page on another site cannot make a visitor's browser enrol or query faces.
    """
    try:
        from fastapi import FastAPI
    except ImportError:
        raise ConfigError("the REST service needs FastAPI: pip install 'fromface[serve]'") from None

    gallery = None
    if gallery_path is not None:
        gallery = Gallery(gallery_path)
        gallery.recognizer = recognizer  # refuses a model other than the gallery's
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if gallery is not None:  # on SIGTERM/SIGINT too: the server shuts down gracefully, then the gallery
            gallery.close()      # folds its write-ahead log into the .db, so the file alone holds every enrolment

    app = FastAPI(title="fromface", description="Occlusion-robust face verification and identification",
                  lifespan=lifespan)
    _install_errors(app)
    _add_routes(app, recognizer, gallery, max_upload_bytes, max_pixels, max_files)
    _add_page(app)
    # Outermost first: the body limit sees every byte before anything else reads it.
    guarded = GuardMiddleware(app, max_body=max_upload_bytes * max_files + 64 * 1024, token=token,
                              allow_origins=tuple(o.rstrip("/") for o in allow_origins))
    app.state.gallery = gallery
    guarded.state = app.state
    return guarded


def _error(status: int, kind: str, detail: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """ASGI wrapper: token check, cross-origin check and a body limit enforced while the body streams in.

    A Content-Length over the limit is refused before any byte is read; a chunked (or lying) body is counted as it
    arrives and the request is answered 413 as soon as it passes the limit, so no upload is ever held whole.
    """

    def __init__(self, app: Any, max_body: int, token: str | None = None, allow_origins: tuple[str, ...] = ()):
        self.app, self.max_body, self.token, self.allow_origins = app, int(max_body), token, allow_origins

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        seen, state = 0, {"over": False, "started": False}

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    state["over"] = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            if state["over"]:
                return  # the app's own answer to the cut-off body is replaced by the 413 below
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if state["over"] and not state["started"]:
            await self._too_large(f"request body is over the limit of {self.max_body:,} bytes")(scope, receive, send)

    def _too_large(self, detail: str):
        # The rest of the body is not read: tell the client the connection ends here.
        return _error(413, "UploadTooLarge", detail, headers={"Connection": "close"})

    def _refusal(self, scope: dict, headers: dict[str, str]):
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return self._too_large(f"request of {int(length):,} bytes is over the limit of {self.max_body:,} bytes")
        origin = headers.get("origin")
        if origin and scope["method"] not in ("GET", "HEAD", "OPTIONS") and not self._origin_allowed(origin, headers):
            return _error(403, "CrossOrigin", f"requests from the web origin {origin} are not allowed; start the "
                          "service with --allow-origin " + origin + " to let its pages call it")
        if self.token is not None and not _is_open(scope["path"], scope["method"]) and scope["method"] != "OPTIONS":
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return _error(401, "Unauthorized", "this service needs 'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": "Bearer"})
        return None

    def _origin_allowed(self, origin: str, headers: dict[str, str]) -> bool:
        """Same origin as the service (the page it serves), or named by --allow-origin."""
        if origin.rstrip("/") in self.allow_origins or "*" in self.allow_origins:
            return True
        return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


def _is_open(path: str, method: str) -> bool:
    """Whether a request is answered without a token: reads of :data:`OPEN_ROUTES` and the page's static files."""
    return method in ("GET", "HEAD") and (path in OPEN_ROUTES or path.startswith(OPEN_PREFIXES))


def _add_page(app: Any) -> None:
    """GET / (the page) and GET /static/NAME (its files). Only the files present at start-up are served, by name, so
    no request path ever reaches the file system."""
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    files = {p.name: p for p in STATIC.glob("*") if p.suffix in _CONTENT_TYPES} if STATIC.is_dir() else {}

    def send(name: str) -> Response:
        if name not in files:
            what = "the web page is not installed with this copy of fromface" if name == "index.html" else \
                f"no such file: /static/{name}"
            raise HTTPException(404, what)
        return Response(files[name].read_bytes(), media_type=_CONTENT_TYPES[files[name].suffix],
                        headers=PAGE_HEADERS)

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return send("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        return send(name)


def panel_data_url(face: Any) -> str:
    """The face's ``--show`` panel (aligned crop, heat map in red, predicted pattern in yellow) as a PNG data URL, so
    a browser can show what the model could not see without drawing it again."""
    import cv2

    from fromface.inference.drawing import face_panel

    ok, png = cv2.imencode(".png", face_panel(face)[..., ::-1])
    if not ok:
        raise ImageError(face.source or "face", "could not encode its picture as PNG")
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii")


def _install_errors(app: Any) -> None:
    """JSON for every error."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(FromfaceError)
    async def _fromface_error(request: Request, exc: FromfaceError):
        return _error(_status_of(exc), type(exc).__name__, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return _error(400, "BadRequest", "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, "HTTPError", str(exc.detail))


def _add_routes(app: Any, recognizer: Any, gallery: Any, max_upload_bytes: int, max_pixels: int,
                max_files: int) -> None:  # long: the routes share one closure over the recognizer, gallery and limits
    from fastapi import File, Form, UploadFile
    from starlette.exceptions import HTTPException

    def face_of(upload: UploadFile, field: str, digest: bool = False):
        """The selected face of an uploaded file (and the sha256 of its bytes); errors name the form field and
        the file."""
        label = f"field '{field}' ({upload.filename or 'no file name'})"
        data = upload.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise UploadTooLarge(f"{label}: upload is over the limit of {max_upload_bytes:,} bytes")
        try:
            image = load_image(data, max_pixels=max_pixels)
            face = recognizer.embed(image)[0]
        except ImageError as exc:
            raise ImageError(label, exc.problem) from None
        except NoFaceError:
            raise NoFaceError(f"{label}: no face found") from None
        except FromfaceError as exc:  # e.g. several faces with select="single"
            detail = str(exc).split(": ", 1)[-1]
            raise type(exc)(f"{label}: {detail}") from None
        face.source = upload.filename or field
        return (face, image_digest(data)) if digest else face

    def need_gallery():
        if gallery is None:
            raise HTTPException(404, "no gallery configured: start the server with --db gallery.db")
        return gallery

    def described(face, show: bool = False) -> dict:
        out = face.to_dict(with_embedding=False)
        out["selected"] = recognizer.select  # which face was used when faces_found > 1
        if show:
            out["panel"] = panel_data_url(face)
        return out

    @app.get("/health")
    def health() -> dict:
        info = None
        if gallery is not None:  # the file's name only: the service does not tell where it keeps its data
            info = {"name": gallery.name, "identities": len(gallery.names()), "templates": len(gallery)}
        return {"status": "ok", "model": recognizer.model_name, "backend": recognizer.backend,
                "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_files": max_files,
                "gallery": info}

    @app.post("/verify")
    def verify(a: Annotated[UploadFile, File()], b: Annotated[UploadFile, File()],
               show: Annotated[bool, Form()] = False) -> dict:
        fa, fb = face_of(a, "a"), face_of(b, "b")
        out = recognizer.verify(fa, fb).to_dict()
        out["faces"] = [described(fa, show), described(fb, show)]
        return out

    @app.post("/identify")
    def identify(image: Annotated[UploadFile, File()], top_k: Annotated[int, Form()] = 5,
                 show: Annotated[bool, Form()] = False) -> dict:
        g = need_gallery()
        face = face_of(image, "image")
        matches = g.identify(face, top_k=max(1, min(int(top_k), MAX_TOP_K)))
        return {"face": described(face, show), "matches": [m.to_dict() for m in matches]}

    @app.post("/enroll")
    def enroll(name: Annotated[str, Form()], images: Annotated[list[UploadFile], File()],
               mode: Annotated[str, Form()] = "new") -> dict:
        g = need_gallery()
        if len(images) > max_files:
            raise HTTPException(413, f"{len(images)} files in one request; the limit is {max_files}")
        name = check_name(name)  # before any embedding work
        g.refuse_existing(name, mode, len(images))
        embedded = [face_of(u, f"images[{k}]", digest=True) for k, u in enumerate(images)]
        return g.enroll_faces(name, [f for f, _ in embedded], [d for _, d in embedded], mode=mode).to_dict()
