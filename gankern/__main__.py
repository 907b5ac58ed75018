"""python -m gankern ... (same as the ``gankern`` console script)."""
import sys

from .cli import main

sys.exit(main())
