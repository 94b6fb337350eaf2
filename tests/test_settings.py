"""The settings (service/settings.py): placeholder admin tokens are refused at start-up."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("token", ["changemechangeme", "aaaaaaaaaaaaaaaaaaaa", "local-dev-token-0123456789", "short"])
def test_placeholder_admin_tokens_are_refused(token):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="METALORA_ADMIN_TOKEN"):
        Settings(admin_token=token)
    assert Settings(admin_token="3f9c1b7e2a8d4c6f0e1a2b3c4d5e6f70").admin_token is not None
