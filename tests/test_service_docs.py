"""docs/api.md matches the code: every route, setting and error code of the service is documented."""

from __future__ import annotations

import re

from service.http.app import create_app
from service.settings import Settings

from .conftest import ROOT

DOC = (ROOT / "docs" / "api.md").read_text()


def test_every_route_is_documented():
    paths = create_app(Settings()).openapi()["paths"]
    for path, ops in paths.items():
        for method in ops:
            assert f"{method.upper()} {path}" in DOC, f"{method.upper()} {path} is missing from docs/api.md"


def test_every_setting_is_documented():
    for name in Settings.model_fields:
        assert f"`METALORA_{name.upper()}`" in DOC, f"METALORA_{name.upper()} is missing from docs/api.md"


def test_every_error_code_is_documented():
    src = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    codes = set(re.findall(r'DomainError\(\s*Kind\.[A-Z_]+,\s*"([a-z_]+)"', src))
    codes |= set(re.findall(r'\b(?:invalid|not_found|too_large|conflict|unavailable|bad)\(\s*"([a-z_]+)"', src))  # bad(): the Open Inference Protocol's
    codes |= {"body_too_large", "internal_error", "invalid_request", "invalid_json", "invalid_base64"}
    assert codes, "no codes found: the regex no longer matches the code"
    for code in codes:
        assert f"`{code}`" in DOC, f"error code {code} is missing from docs/api.md"


def test_supported_image_formats_are_listed_exactly():
    """README and docs/api.md name the formats the decoder accepts, no more and no fewer."""
    from metalora.images import SUPPORTED_FORMATS

    listed = "`" + "`, `".join(sorted(SUPPORTED_FORMATS)[:-1]) + "`"
    assert f"{listed} or `{sorted(SUPPORTED_FORMATS)[-1]}`" in (ROOT / "README.md").read_text()
    assert f"**Formats** (Pillow's names): {listed}, `{sorted(SUPPORTED_FORMATS)[-1]}`." in DOC


def test_every_image_error_code_is_documented():
    src = (ROOT / "metalora" / "images.py").read_text()
    codes = set(re.findall(r'ImageError\(\s*"([a-z_]+)"', src))
    assert {"extreme_aspect_ratio", "unsupported_image", "image_too_large"} <= codes
    for code in codes:
        assert f"`{code}`" in DOC, f"image error code {code} is missing from docs/api.md"
