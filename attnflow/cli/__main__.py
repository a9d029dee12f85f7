"""``python -m attnflow.cli``: the attnflow command line."""

import sys

from . import main

sys.exit(main())
