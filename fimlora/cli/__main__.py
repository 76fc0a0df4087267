"""``python -m fimlora.cli`` (how torchrun and accelerate launch the command line)."""

import sys

from . import main

sys.exit(main())
