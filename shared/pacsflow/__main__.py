"""``python -m pacsflow`` is the ``pacsflow`` command."""

import sys

from pacsflow.cli import main

sys.exit(main())
