"""Hold files.locked(argv[1]) for ten minutes (until killed), after printing "locked". Run by tests.py with the
checkout on PYTHONPATH."""
import sys
import time

import files

with files.locked(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
