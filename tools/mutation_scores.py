"""Per-module mutation scores from mutmut's results: what `make mutation` prints and docs/testing.md reports.

    mutmut results --all true | python tools/mutation_scores.py

A mutant counts as caught when a test failed (killed) or hung (timeout); it survives when every test passed or
when no test ran its code at all ("no tests"): an untested line is as unprotected as a tested one that passes.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict

LINE = re.compile(r"^\s*(?P<module>fromface(?:\.[a-z_0-9]+)+?)\.x\S*__mutmut_\d+: (?P<status>.+?)\s*$")
CAUGHT = {"killed", "timeout"}
SURVIVED = {"survived", "no tests"}


def main() -> None:
    counts: dict[str, Counter] = defaultdict(Counter)
    for line in sys.stdin:
        if match := LINE.match(line):
            counts[match["module"]][match["status"]] += 1
    if not counts:
        raise SystemExit("no mutmut results on stdin (run `mutmut run` first)")
    print("| module | mutants | killed | timeout | survived | no tests | surviving |")
    print("|---|---|---|---|---|---|---|")
    for module in sorted(counts):
        c = counts[module]
        total = sum(c.values())
        unchecked = total - sum(c[s] for s in CAUGHT | SURVIVED)
        surviving = sum(c[s] for s in SURVIVED) / max(total - unchecked, 1)
        note = f" ({unchecked} not checked)" if unchecked else ""
        print(f"| `{module}` | {total} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['no tests']} | "
              f"{surviving:.0%}{note} |")


if __name__ == "__main__":
    main()
