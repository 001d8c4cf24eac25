"""``python -m pdserve.cluster.cli``: the ``pdserve`` command."""

import sys

from pdserve.cluster.cli import main

sys.exit(main())
