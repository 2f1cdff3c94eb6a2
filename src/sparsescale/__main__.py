import sys

from sparsescale.cli import main

sys.exit(main())
