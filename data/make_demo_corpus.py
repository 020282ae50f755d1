"""Write a demo corpus from text every Python installation carries: its standard library's source.

Python code is a good first corpus: regular enough that a few minutes of CPU training
produce recognisable output, varied enough to be interesting, and on every machine
with Python, so `make demo` works offline and the project ships no borrowed text.
"""

import sys
import sysconfig
from pathlib import Path

LIMIT = 1_500_000  # characters: about tinyshakespeare's size


def main(out: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.isascii() or total + len(text) > LIMIT:
            continue
        parts.append(text)
        total += len(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    print(f"wrote {out}: {total:,} characters from {len(parts)} standard-library modules")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo.txt"))
