"""``python -m safety_patch.cli`` (``accelerate launch -m safety_patch.cli``): the console script's path."""

import sys

from safety_patch.entry import main

sys.exit(main())
