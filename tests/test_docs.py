"""The documentation site's API reference lists every public name of arraybn."""

from __future__ import annotations

import os
import re

import arraybn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_reference_lists_every_public_name() -> None:
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        text = f.read()
    documented = set(re.findall(r"^::: arraybn\.(\w+)", text, flags=re.MULTILINE))
    missing = sorted(n for n in arraybn.__all__ if n != "__version__" and n not in documented)
    assert not missing, f"docs/api.md lacks {missing}"
    assert "__version__" in text


def test_site_navigation_names_existing_pages() -> None:
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        pages = re.findall(r":\s*([\w-]+\.md)\s*$", f.read(), flags=re.MULTILINE)
    assert "api.md" in pages
    for page in pages:
        assert os.path.exists(os.path.join(ROOT, "docs", page)), page
