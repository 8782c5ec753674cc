import signal

# supervisord signals processes that are still starting; a SIGHUP before the
# real handler is installed must not kill us (see worker.py).
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # log reopening, likewise

import sys  # noqa: E402

from lbc_workers.proxy.worker import main  # noqa: E402

sys.exit(main())
