import sys

from epp.sidecar.cli import main

sys.exit(main())
