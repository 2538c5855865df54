"""The REST app: POST /verify, /identify, /enroll and GET /health, with upload and pixel limits and JSON errors.

Every error is JSON ``{"error": <kind>, "detail": <message>}``: 400 for unreadable images and bad requests, 413 for
uploads over the size limit, 422 when no (or more than one allowed) face is found, 404 when no gallery is configured.
Handlers are plain functions, so FastAPI runs them in its thread pool; the model and gallery are thread-safe.
"""

import os
from typing import Annotated, Any

from fromface.errors import ConfigError, DataError, FromfaceError, ImageError, NoFaceError

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # per file
MAX_PIXELS = 25_000_000  # per image
MAX_FILES = 20  # per enrol request


class UploadTooLarge(FromfaceError):
    """An uploaded file is over the size limit."""


_STATUS = {ImageError: 400, DataError: 400, ConfigError: 400, NoFaceError: 422, UploadTooLarge: 413}


def _status_of(exc: FromfaceError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 422  # e.g. ManyFacesError


def create_app(recognizer: Any, gallery_path: str | os.PathLike | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS, max_files: int = MAX_FILES):
    """Build the FastAPI app around one :class:`FaceRecognizer` and, optionally, a gallery file."""
    try:
        from fastapi import FastAPI
    except ImportError:
        raise ConfigError("the REST service needs FastAPI: pip install 'fromface[serve]'") from None
    from fromface.inference.gallery import Gallery

    app = FastAPI(title="fromface", description="Occlusion-robust face verification and identification")
    gallery = Gallery(gallery_path, recognizer=recognizer) if gallery_path is not None else None
    # Whole request bound: all files at their limit plus room for the multipart framing and form fields.
    _install_errors(app, max_body=max_upload_bytes * max_files + 64 * 1024)
    _add_routes(app, recognizer, gallery, max_upload_bytes, max_pixels, max_files)
    app.state.gallery = gallery
    return app


def _error(status: int, kind: str, detail: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": kind, "detail": detail}, status_code=status)


def _install_errors(app: Any, max_body: int) -> None:
    """JSON for every error, and a request-size check before any body is read."""
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

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body:
            return _error(413, "UploadTooLarge", f"request of {int(length):,} bytes is over the limit of "
                          f"{max_body:,} bytes")
        return await call_next(request)


def _add_routes(app: Any, recognizer: Any, gallery: Any, max_upload_bytes: int, max_pixels: int,
                max_files: int) -> None:
    from fastapi import File, Form, UploadFile
    from starlette.exceptions import HTTPException

    from fromface.data.images import load_image

    def read(upload: UploadFile):
        name = upload.filename or "upload"
        data = upload.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise UploadTooLarge(f"{name}: upload is over the limit of {max_upload_bytes:,} bytes")
        try:
            return load_image(data, max_pixels=max_pixels)
        except ImageError as exc:
            raise ImageError(name, exc.problem) from None

    def need_gallery():
        if gallery is None:
            raise HTTPException(404, "no gallery configured: start the server with --db gallery.db")
        return gallery

    @app.get("/health")
    def health() -> dict:
        info = None
        if gallery is not None:
            info = {"path": str(gallery.path), "identities": len(gallery.names()), "templates": len(gallery)}
        return {"status": "ok", "model": recognizer.model_name, "backend": recognizer.backend,
                "max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "gallery": info}

    @app.post("/verify")
    def verify(a: Annotated[UploadFile, File()], b: Annotated[UploadFile, File()]) -> dict:
        fa = _named(recognizer.embed(read(a)), a)
        fb = _named(recognizer.embed(read(b)), b)
        return recognizer.verify(fa, fb).to_dict()

    @app.post("/identify")
    def identify(image: Annotated[UploadFile, File()], top_k: Annotated[int, Form()] = 5) -> dict:
        g = need_gallery()
        face = _named(recognizer.embed(read(image)), image)
        matches = g.identify(face, top_k=max(1, min(int(top_k), 100)))
        return {"face": face.to_dict(with_embedding=False), "matches": [m.to_dict() for m in matches]}

    @app.post("/enroll")
    def enroll(name: Annotated[str, Form()], images: Annotated[list[UploadFile], File()]) -> dict:
        g = need_gallery()
        if len(images) > max_files:
            raise HTTPException(413, f"{len(images)} files in one request; the limit is {max_files}")
        added = g.enroll(name, [read(u) for u in images])
        return {"name": name, "added": added, "templates": g.counts().get(name.strip(), 0)}


def _named(faces: list, upload: Any):
    """The first (selected) face, its source set to the uploaded file name."""
    face = faces[0]
    face.source = upload.filename or "upload"
    return face
