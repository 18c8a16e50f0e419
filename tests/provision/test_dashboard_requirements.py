"""The dashboard's web stack (Starlette, uvicorn) goes into admin kits' requirements only: sites and the
server never import it, so their kits do not install it."""

from __future__ import annotations

import importlib.metadata

from provision import render
from provision.render import Kind, kit_requirements

DECLARED = ["numpy>=1.26", "starlette==1.10.0", "uvicorn==0.54.0", "pytest>=8; extra == 'dev'"]


def _names(kind: Kind) -> set[str]:
    return {req.split("==", 1)[0] for req in kit_requirements(kind)}


def test_only_admin_kits_pin_the_dashboard_stack(monkeypatch):
    monkeypatch.setattr(render.importlib.metadata, "requires", lambda dist: DECLARED)
    assert _names(Kind.ADMIN) == {"numpy", "starlette", "uvicorn"}
    assert _names(Kind.CLIENT) == {"numpy"}
    assert _names(Kind.SERVER) == {"numpy"}
    assert f"starlette=={importlib.metadata.version('starlette')}" in kit_requirements(Kind.ADMIN)
