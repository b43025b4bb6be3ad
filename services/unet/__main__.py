"""python -m luna_stack.unet: serve the unet service (same as `luna-stack serve unet`)."""

import sys

from luna_stack.cli import main

sys.exit(main(["serve", "unet", *sys.argv[1:]]))
