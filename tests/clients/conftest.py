# The session-wide demo model of the server tests: loaded once when both suites run together.
from tests.server.conftest import demo  # noqa: F401
