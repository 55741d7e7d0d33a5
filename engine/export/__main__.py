"""`python -m engine.export export|build-engines ...`: the same commands as `tiue export|build-engines`."""

import sys

from engine.export.cli import main

sys.exit(main())
