"""``python -m blocktrace``: the same as the ``blocktrace`` command."""

import sys

from blocktrace.cli.main import main

sys.exit(main())
