from __future__ import annotations

import sys

from postfach.cli import main

sys.exit(main())
