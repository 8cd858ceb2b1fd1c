"""``python -m meshkeeper.demo``: the same as ``meshkeeper demo``."""

import sys

from meshkeeper.demo import run

sys.exit(run())
