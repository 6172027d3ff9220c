"""Lets pytest import the browser package as the page does: `import tokenwire.core...`.

In the browser (and under MicroPython in run_micropython.mjs) `frontend/` is the import root,
so the test modules here import `tokenwire`, not `frontend.tokenwire`.
"""

import os
import sys

FRONTEND = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "frontend"))
if FRONTEND not in sys.path:
    sys.path.insert(0, FRONTEND)
