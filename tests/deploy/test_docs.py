"""docs/deploy.md names only files that exist."""

import re

from tests.deploy.helpers import ROOT


def test_every_file_the_deployment_guide_names_exists():
    text = (ROOT / "docs/deploy.md").read_text()
    named = set(re.findall(r"`((?:deploy|tests/deploy)/[\w./-]*|docker-compose[\w.]*\.yml|Dockerfile|\.dockerignore)`",
                           text))
    assert len(named) > 10
    for path in sorted(named):
        assert (ROOT / path).exists(), path
