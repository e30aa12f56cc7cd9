"""train.main(argv[2:]) with files limited to argv[1] bytes (RLIMIT_FSIZE), as on a full disk. Run by tests.py with
the checkout on PYTHONPATH."""
import resource
import signal
import sys

import train

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing the process
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(train.main(sys.argv[2:]))
