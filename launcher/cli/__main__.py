"""`python -m launcher.cli`: the `launcher` program."""

import sys

from launcher.cli.main import main

sys.exit(main())
