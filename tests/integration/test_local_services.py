"""avatarflow.local.services: `local up`, `status` and `down` with real SeaweedFS and the local API."""

from __future__ import annotations

import httpx

from avatarflow.local.services import registry, stack


def test_secrets_not_in_repr(s3_service):
    assert s3_service.secret_key not in repr(s3_service)
    api = registry.ApiService(base_url="http://127.0.0.1:1", api_key="sekrit-key", pid=None)
    assert "sekrit-key" not in repr(api)
    assert "sekrit-key" not in repr(registry.Services(home=None, api=api))


def test_services_up_status_down_s3_only(tmp_path):
    home = tmp_path / "home"
    try:
        svcs = stack.up(home, with_api=False)
        assert svcs.s3 is not None and svcs.api is None
        st = stack.status(home)
        assert st.s3.running and st.s3.answering and st.s3.pid == svcs.s3.pid
        # reuse: a second up returns the same process
        again = stack.up(home, with_api=False)
        assert again.s3.pid == svcs.s3.pid
        loaded = registry.load_services(home)
        assert loaded.s3.endpoint_url == svcs.s3.endpoint_url
        assert (home / "services.json").stat().st_mode & 0o077 == 0
        client = loaded.s3.client()
        client.put_object(Bucket=loaded.s3.bucket, Key="k", Body=b"v")
        first_keys = (svcs.s3.access_key, svcs.s3.secret_key)
    finally:
        stack.down(home)
    st = stack.status(home)
    assert not st.s3.running and not st.s3.answering and st.s3.pid is None
    # a restart keeps credentials and data
    try:
        svcs = stack.up(home, with_api=False)
        assert (svcs.s3.access_key, svcs.s3.secret_key) == first_keys
        client = svcs.s3.client()
        assert client.get_object(Bucket=svcs.s3.bucket, Key="k")["Body"].read() == b"v"
    finally:
        stack.down(home)


def test_services_up_status_down_with_api(tmp_path):
    home = tmp_path / "home"
    try:
        svcs = stack.up(home)
        assert svcs.api is not None
        st = stack.status(home)
        assert st.api.running and st.api.answering
        r = httpx.get(svcs.api.base_url + registry.API_HEALTH_PATH, trust_env=False,
                      headers={"x-api-key": svcs.api.api_key})
        assert r.status_code == 200
        assert stack.up(home).api.pid == svcs.api.pid
    finally:
        stack.down(home)
    st = stack.status(home)
    assert not st.api.running and not st.s3.running


def test_status_of_empty_home(tmp_path):
    st = stack.status(tmp_path / "nothing")
    assert st.s3 is None and st.api is None
    assert registry.load_services(tmp_path / "nothing") is None
    assert stack.down(tmp_path / "nothing").s3 is None
