"""python -m luna_stack.clip: serve the clip service (same as `luna-stack serve clip`)."""

import sys

from luna_stack.cli import main

sys.exit(main(["serve", "clip", *sys.argv[1:]]))
