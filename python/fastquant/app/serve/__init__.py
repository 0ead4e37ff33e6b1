"""Serving a fastquant checkpoint on Ray Serve (``pip install fastquant[serve]``): see :mod:`fastquant.app.serve.app`.

``fastquant.app.serve.start(ServeConfig(checkpoint=..., api_keys=...))`` is the Python entry point of ``fastquant
serve``. Ray is imported only when serving starts, so the command line and the key tools work without it.
"""

from __future__ import annotations

from typing import Any

from fastquant.app.serve.config import ServeConfig

__all__ = ["ServeConfig", "start"]


def start(config: ServeConfig, *, address: str | None = None) -> str:
    """Start serving; returns the base URL. See :func:`fastquant.app.serve.app.start`."""
    from fastquant.app.serve.app import start as _start

    return _start(config, address=address)


def __dir__() -> list[Any]:
    return sorted(__all__)
