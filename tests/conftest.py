from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """`recipe.cache_dir` of the recipe CLI tests: embedded bases are cached by content hash, so tests
    that pretrain the same base share it."""
    return tmp_path_factory.mktemp("recipe_base_cache")
