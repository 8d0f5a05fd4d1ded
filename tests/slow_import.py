"""A module whose import takes 0.3 s (a heavy library's lazy first use)."""

import time

time.sleep(0.3)
