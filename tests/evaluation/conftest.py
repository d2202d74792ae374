import argparse

import pytest

from server.evaluation import add_eval_parser
from server.settings import ServerSettings
from tests.server.conftest import demo  # noqa: F401
from tests.server.live import LiveServer


@pytest.fixture(scope="session")
def live(demo):  # noqa: F811
    """The demo model behind a real server on loopback, shared by the evaluation tests."""
    model, proc = demo
    with LiveServer(ServerSettings(), (model, proc, "shapes-demo")) as srv:
        yield srv


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vlmamba")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def run_eval(argv: list[str]) -> int:
    args = parse(argv)
    return args.func(args)
