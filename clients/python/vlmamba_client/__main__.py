"""``python -m vlmamba_client`` = the ``vlmamba-client`` command."""

import sys

from vlmamba_client.cli import main

sys.exit(main())
