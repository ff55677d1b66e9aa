"""``python -m conmim.cli``: how a Ray job's entrypoint runs the command line (conmim.run.jobs)."""
import sys

from conmim.cli import main

sys.exit(main())
