"""``python -m retention.interfaces.cli``."""

import sys

from retention.interfaces.cli import main

sys.exit(main())
