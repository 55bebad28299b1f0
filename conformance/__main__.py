"""``python -m conformance check ...``: the conformance CLI (see ``conformance.cli``)."""

import sys

from conformance.cli import main

sys.exit(main())
