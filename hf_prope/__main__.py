"""``python -m hf_prope`` = the ``hf-prope`` command."""

import sys

from .cli import main

sys.exit(main())
