"""``python -m devstack [ROOT]``: the embedded stack in the foreground until Ctrl-C."""

import sys

from devstack.stack import main

sys.exit(main())
