"""``python -m service.cli``: what the ``segments`` console script runs."""

import sys

from service.cli import main

sys.exit(main())
