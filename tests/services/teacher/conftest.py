"""The teacher service's tests use the session's one teacher process (`teacher_server` in tests/conftest.py, built by
tests/teacher_server.py); its key, admission bound and body limit are re-exported here for them."""

from tests.teacher_server import API_KEY, MAX_PENDING_REQUESTS, MAX_REQUEST_BYTES  # noqa: F401
