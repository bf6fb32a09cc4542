"""The teacher service's tests use the session's one teacher process (`teacher_server` in tests/conftest.py, built by
tests/teacher_server.py); its key and admission bound are re-exported here for them."""

from tests.teacher_server import API_KEY, MAX_PENDING_REQUESTS  # noqa: F401
