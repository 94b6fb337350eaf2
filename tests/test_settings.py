"""The settings (service/settings.py): admin tokens that are placeholders, too short or one
repeated character are refused at start-up; list settings read comma-separated names."""

from __future__ import annotations

import pytest

from service.settings import Settings


@pytest.mark.parametrize("token", ["changemechangeme", "aaaaaaaaaaaaaaaaaaaa", "local-dev-token-0123456789", "short"])
def test_placeholder_admin_tokens_are_refused(token):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="METALORA_ADMIN_TOKEN"):
        Settings(admin_token=token)
    assert Settings(admin_token="3f9c1b7e2a8d4c6f0e1a2b3c4d5e6f70").admin_token is not None


def test_unsafe_admin_tokens_are_refused():
    import pytest
    from pydantic import ValidationError

    for bad in ("changeme", "short", "CHANGETHIS"):
        with pytest.raises(ValidationError):
            Settings(admin_token=bad)
    assert Settings(admin_token="").admin_token is None
    good = "5e0d8c1f2b7a4e9c6d3f1a0b"
    assert Settings(admin_token=good).admin_token.get_secret_value() == good
    with pytest.raises(ValidationError):  # long but one repeated character
        Settings(admin_token="x" * 20)
    assert Settings(adapters="a, b@2", pinned="b@2").adapters == ["a", "b@2"]
