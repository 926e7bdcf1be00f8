"""`python -m gsopt`: Ctrl-C while the libraries load prints `interrupted`, as it does later."""

import sys

try:
    from gsopt.cli import main
except KeyboardInterrupt:
    print("gsopt: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
