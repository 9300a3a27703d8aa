"""`python -m lowbit ...` (and `torchrun -m lowbit ...`): the command line."""

import sys

from lowbit.cli import main

sys.exit(main())
