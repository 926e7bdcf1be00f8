import sys

from gsopt.cli import main

sys.exit(main())
