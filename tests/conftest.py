"""Shared fixtures. Tests that need the real data/networks in ``../shared`` skip cleanly without it."""
import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("JAXROBUST_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def shared_path(*parts) -> Path:
    """Path inside the shared folder; skips the calling test when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


@pytest.fixture
def shared():
    return shared_path
