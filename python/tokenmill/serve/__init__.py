"""Serving: the OpenAI-compatible HTTP server over a Scheduler (optional extra: tokenmill[server])."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
