"""``python -m linguamq ...`` is the ``linguamq`` command."""

import sys

from linguamq.tools.cli import main

sys.exit(main())
