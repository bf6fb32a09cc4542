"""The curator's probes on its real app (no worker, no engine): readiness says where Redis is that does not answer,
never the password in its URL (the probes need no key, and compose puts Redis's password in the URL)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from services.curator.app import create_app
from services.curator.settings import CuratorSettings
from tests.teacher_server import free_port


def test_readiness_names_a_silent_redis_without_its_password():
    url = f"redis://:pw-s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = CuratorSettings(redis_url=url, curator_api_key="curator-key")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/readyz")
    assert response.status_code == 503, response.text
    assert f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}" in response.text
    assert "pw-s3cret" not in response.text
