"""Write the generated tables into README.md: the configuration table (between the config-table markers)
and the demo models' shapes (between the demo-models markers).

Run after adding or changing a setting or the demo fixtures: `python tools/update_readme.py`.
tests/test_config.py and tests/test_readme.py fail while the README's tables differ from the code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from luna_stack.config import settings_table
from luna_stack.devtools.fixtures import demo_models_table

README = Path(__file__).resolve().parents[1] / "README.md"
PATTERN = re.compile(r"(<!-- config-table:start[^>]*-->\n).*?(<!-- config-table:end -->)", re.S)
DEMO = re.compile(r"(<!-- demo-models:start[^>]*-->\n).*?(<!-- demo-models:end -->)", re.S)


def render(text: str) -> str:
    for pattern, table in ((PATTERN, settings_table), (DEMO, demo_models_table)):
        if not pattern.search(text):
            sys.exit(f"README.md lacks the markers of {pattern.pattern[:30]}...")
        text = pattern.sub(lambda m, table=table: m.group(1) + table() + "\n" + m.group(2), text)
    return text


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
    print(f"updated {README}")
