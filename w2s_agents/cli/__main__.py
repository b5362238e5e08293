"""``python -m w2s_agents.cli`` runs the ``w2s`` command line."""

import sys

from w2s_agents.cli import main

sys.exit(main())
