"""python -m gankern ... (same as the ``gankern`` console script)."""
import sys

from .gan.cli import main

sys.exit(main())
