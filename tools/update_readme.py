"""Write the configuration table into README.md (between the config-table markers).

Run after adding or changing a setting: `python tools/update_readme.py`. tests/test_config.py fails
while the README's table differs from `luna-stack config`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from luna_stack.config import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
PATTERN = re.compile(r"(<!-- config-table:start[^>]*-->\n).*?(<!-- config-table:end -->)", re.S)


def render(text: str) -> str:
    if not PATTERN.search(text):
        sys.exit("README.md lacks the config-table markers")
    return PATTERN.sub(lambda m: m.group(1) + settings_table() + "\n" + m.group(2), text)


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
    print(f"updated {README}")
