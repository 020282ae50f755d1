"""Write a demo corpus from text every Python installation carries: its standard library's source.

Python code is a good first corpus: regular enough that a few minutes of CPU training
produce recognisable output, varied enough to be interesting, and on every machine
with Python, so `make demo` works offline and the project ships no borrowed text.
"""

import sys
import sysconfig
from pathlib import Path

LIMIT = 1_000_000  # characters of training text: about tinyshakespeare's size
HELD_OUT = 100_000  # characters of other modules, for `tfcli eval`


def main(out: Path, val_out: Path) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.isascii():
            continue
        for part, limit in ((train, LIMIT), (val, HELD_OUT)):
            if sum(map(len, part)) + len(part) + len(text) <= limit:  # (len(part): the newlines joining them)
                part.append(text)
                break
    for path, part in ((out, train), (val_out, val)):
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(part)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}: {len(text):,} characters from {len(part)} standard-library modules")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/demo.txt"),
         Path(sys.argv[2] if len(sys.argv) > 2 else "data/demo-val.txt"))
