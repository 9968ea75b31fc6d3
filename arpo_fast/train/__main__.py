"""``python -m arpo_fast.train``: see :mod:`arpo_fast.train.loop`."""

import sys

from arpo_fast.train.loop import main

sys.exit(main())
