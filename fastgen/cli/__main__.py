"""``python -m fastgen.cli``: the ``fastgen`` command."""
import sys

from . import main

sys.exit(main())
