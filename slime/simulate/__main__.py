"""`python -m slime.simulate`: the simulator's command line (slime/simulate/cli.py)."""

import sys

from slime.simulate.cli import main

if __name__ == "__main__":
    sys.exit(main())
