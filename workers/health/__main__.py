import signal

# supervisord signals processes that are still starting; a SIGHUP before the
# real handler is installed must not kill us.
signal.signal(signal.SIGHUP, signal.SIG_IGN)

import sys  # noqa: E402

from lbc_workers.health.checker import main  # noqa: E402

sys.exit(main())
