import sys

from epp.sim.cli import main

sys.exit(main())
