"""`python -m depeche_nb` is the `depeche-nb` command."""

import sys

from depeche_nb.cli import main

sys.exit(main())
