"""The README's code runs as written: a reader copies it into a notebook first."""

import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def library_example() -> str:
    section = README.read_text().split("\n## Library\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_library_example_runs_and_its_two_generators_agree(tmp_path, monkeypatch, capsys):
    code = library_example()
    assert "max_steps=500" in code
    monkeypatch.chdir(tmp_path)
    Path("input.txt").write_text("ROMEO: To be, or not to be; some held-out text.\n" * 300)
    scope: dict = {}
    exec(code.replace("max_steps=500", "max_steps=3"), scope)  # (the same run, shorter)
    assert (tmp_path / "runs" / "nb" / "model.safetensors").is_file()
    text = scope["model"].generate("ROMEO:", 200, seed=1)
    assert len(text) == 200 and capsys.readouterr().out.endswith(f"{text}\n{text}")  # printed twice, the same
    L, H = scope["model"].config.n_layer, scope["model"].config.n_head
    assert scope["att"].weights.shape[:2] == (L, H)
    assert math.isfinite(scope["score"].loss) and scope["score"].loss > 0
