"""``python -m daemon`` is ``infinitetalkd``."""

import sys

from daemon.cli import main

sys.exit(main())
