"""``python -m streampipe``: the same as the ``streampipe`` command."""

import sys

from streampipe.cli import main

sys.exit(main())
