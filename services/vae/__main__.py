"""python -m luna_stack.vae: serve the vae service (same as `luna-stack serve vae`)."""

import sys

from luna_stack.cli import main

sys.exit(main(["serve", "vae", *sys.argv[1:]]))
