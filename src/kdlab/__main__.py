"""`python -m kdlab` (used by `accelerate launch -m kdlab distill ...`)."""

import sys

from kdlab.cli import main

sys.exit(main())
