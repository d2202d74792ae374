# The session-wide demo model of the server tests (loaded once when both suites run together),
# their sample scenes and image server.
from tests.server.conftest import demo, images, samples  # noqa: F401
