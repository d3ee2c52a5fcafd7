"""``python -m fastflow``: the ``fastflow`` command line (:mod:`fastflow.cli`)."""

import sys

from fastflow.cli import main

sys.exit(main())
