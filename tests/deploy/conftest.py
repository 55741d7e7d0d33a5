"""Fixtures for the deployment checks: each kustomize overlay rendered once per session."""

from __future__ import annotations

from typing import Any

import pytest
from deploy_checks import OVERLAYS, ROOT, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """overlay name -> its rendered objects (`kubectl kustomize k8s/overlays/NAME`)."""
    return {name: render(ROOT / "k8s" / "overlays" / name) for name in OVERLAYS}
