"""``python -m harness.serving_bench [drive|baseline|reference] ...``."""

import sys

from harness.serving_bench.bench import main

sys.exit(main())
