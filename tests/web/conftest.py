from tests.server.conftest import demo  # noqa: F401
