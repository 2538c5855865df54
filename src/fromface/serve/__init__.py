"""A small REST service over FaceRecognizer and Gallery (FastAPI; ``pip install 'fromface[serve]'``)."""

from fromface.serve.app import create_app

__all__ = ["create_app"]
