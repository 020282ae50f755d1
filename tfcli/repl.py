"""`tfcli sample --interactive`: one loaded model, one growing text, lines typed in turn.

`Session` owns the text and the sampling settings and talks through one callback,
`write(kind, text, logprob)`, so tests drive it with a list of lines and the CLI
with a terminal. The choices a user meets:
- a typed line joins the text with its newline (Enter is part of the text, as in
  llama.cpp); a line ending in `\\` joins without one; an empty line adds nothing
  and lets the model go on; `//` types a literal leading `/`;
- each continuation re-reads the text's last block_size characters (one prefill),
  so typing, /undo and /reset cost nothing, and text past the context works;
- a stop string ends a continuation and stays in the text (llama.cpp's reverse
  prompt); Ctrl-C while the model writes keeps what it wrote and returns to you.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from .config import SampleConfig, check_seed
from .corpus import show_char
from .errors import TfcliError, UsageError, command_line
from .render.heatmap import eighths_bar
from .stopping import Terminated

# kinds: "prompt" (the starting text), "typed" (a line joining the text), "generated", "listing" (what a
# command shows), "info" (a remark), "error" (a one-line refusal; the session goes on)
Write = Callable[[str, str, "float | None"], None]

# command -> (SampleConfig field, type); "off" clears the optional filters
SETTINGS = {"temp": ("temperature", float), "top-k": ("top_k", int), "top-p": ("top_p", float),
            "min-p": ("min_p", float), "repeat-penalty": ("repeat_penalty", float), "n": ("max_new_tokens", int)}
OPTIONAL = {"top_k", "top_p", "min_p"}
HELP = """\
Type text and press Enter: it joins the text with its newline, then the model continues.
End a line with \\ to add it without the newline; an empty line lets the model go on; // types a leading /.
Ctrl-C stops the model; Ctrl-C or Ctrl-D at the prompt quits.
  /temp T  /top-k K  /top-p P  /min-p P  /repeat-penalty R  /n N   change a setting (no value: show it;
                                                                     off clears top-k, top-p, min-p)
  /seed N        restart the random numbers from N (-1: a random N)
  /top [K]       the K likeliest next characters (default 10): the model's and sampling's probabilities
  /undo          drop the last change: a continuation, then the text typed before it
  /reset         back to the starting prompt
  /show          print the whole text
  /help, /quit"""
BAR_WIDTH = 20


class Session:
    """The running text of an interactive session, and the commands that change it."""

    def __init__(self, model, cfg: SampleConfig, write: Write, prompt: str = "", seed: int = 0,
                 fit: Callable[[str], str] | None = None):
        self.model, self.vocab, self.cfg, self.write = model, model.vocab, replace(cfg, num_samples=1), write
        self.prompt = self.text = prompt
        self.fit = fit or self._refuse_unknown
        self.undo_stack: list[str] = []
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """The first continuation uses `seed` itself (so it matches `tfcli sample --seed`); later ones draw
        their seeds from it, so the same seed and lines replay the same session."""
        self.seed, self.next_seed, self.rng = seed, seed, random.Random(seed)

    def _refuse_unknown(self, text: str) -> str:
        self.vocab.encode(text)  # raises UsageError naming the characters the model never saw
        return text

    def run(self, lines: Iterable[str]) -> None:
        """Continue the prompt (if any), then take lines until they run out or one is /quit."""
        if self.prompt:
            self.write("prompt", self.prompt, None)
            self.generate()
        for line in lines:
            if not self.feed(line):
                return

    def feed(self, line: str) -> bool:
        """Handle one typed line; False once the user asks to quit."""
        if line.startswith("/") and not line.startswith("//"):
            return self.command(line[1:].split())
        self.type_text(line[1:] if line.startswith("//") else line)
        return True

    def type_text(self, line: str) -> None:
        text = line[:-1] if line.endswith("\\") else line + "\n" if line else ""
        try:
            text = self.fit(text)
        except TfcliError as e:
            self.write("error", e.message, None)
            return
        if text:
            self.write("typed", text, None)
            self._set(self.text + text)
        self.generate()

    def generate(self) -> None:
        """One continuation, streamed through `write`; Ctrl-C ends it early and keeps what came."""
        from .sampling import generate_pieces

        if self.cfg.max_new_tokens == 0:
            return
        cfg = replace(self.cfg, seed=self.next_seed)
        self.next_seed = self.rng.getrandbits(31)
        out: list[str] = []
        try:
            for piece in generate_pieces(self.model, self.vocab, self.text, cfg):
                if piece.chars[0]:  # the raw characters: a stop string stays in the text
                    out.append(piece.chars[0])
                    self.write("generated", piece.chars[0], piece.logprobs[0])
        except Terminated:
            raise  # (SIGTERM, from `timeout` or a service manager, ends the session: exit 143)
        except KeyboardInterrupt:
            self.write("info", "stopped", None)
        if out:
            self._set(self.text + "".join(out))

    def _set(self, text: str) -> None:
        self.undo_stack.append(self.text)
        self.text = text

    def top(self, k: int) -> list[tuple[str, float, float]]:
        """The k likeliest next characters: (char, model's probability, sampling's), likeliest first."""
        from .sampling import next_char_probs

        model_p, sampled_p = next_char_probs(self.model, self.vocab, self.text, self.cfg)
        order = (-model_p).argsort(kind="stable")[:k].tolist()
        return [(self.vocab.chars[i], float(model_p[i]), float(sampled_p[i])) for i in order]

    # -- commands ---------------------------------------------------------------------------

    def command(self, words: list[str]) -> bool:
        name, args = (words[0], words[1:]) if words else ("", [])
        if name in ("quit", "exit"):
            return False
        try:
            if name in SETTINGS:
                self.setting(name, args)
            elif name in COMMANDS:
                method, most = COMMANDS[name]
                if len(args) > most:
                    raise UsageError(f"/{name} takes {'one value' if most else 'nothing'}, got {' '.join(args)!r}")
                method(self, *args)
            else:
                raise UsageError(f"unknown command /{name}; /help lists them")
        except UsageError as e:
            self.write("error", e.message, None)
        return True

    def setting(self, name: str, args: list[str]) -> None:
        field, kind = SETTINGS[name]
        if not args:
            self.write("info", f"{name} {getattr(self.cfg, field)}", None)
            return
        if len(args) > 1:
            raise UsageError(f"/{name} takes one value, got {' '.join(args)!r}")
        value = None if args[0] == "off" and field in OPTIONAL else _number(name, args[0], kind)
        value = None if field == "top_k" and value == 0 else value  # (0: off, as in llama.cpp)
        try:
            with command_line():  # (the message names the command line's flag; here it is typed as /name)
                self.cfg = replace(self.cfg, **{field: value}).validate()
        except UsageError as e:
            flag = {"temperature": "--temperature", "max_new_tokens": "-n/--max-new-tokens"}.get(
                field, "--" + field.replace("_", "-"))
            raise UsageError(e.message.replace(flag, f"/{name}")) from None
        self.write("info", f"{name} {value if value is not None else 'off'}", None)

    def cmd_seed(self, value: str | None = None) -> None:
        if value is not None:
            seed = _number("seed", value, int)
            if seed == -1:  # as with `tfcli sample --seed -1`: a random one, said below
                from .sampling import new_seed
                seed = new_seed()
            try:
                with command_line():
                    check_seed(seed)
            except UsageError as e:
                raise UsageError(e.message.replace("--seed", "/seed")) from None
            self.reseed(seed)
        self.write("info", f"seed {self.seed}", None)

    def cmd_top(self, k: str = "10") -> None:
        n = _number("top", k, int)
        if n < 1:
            raise UsageError(f"/top needs a positive count, got {n}")
        rows = self.top(min(n, len(self.vocab)))
        width = max(len("char"), *(len(show_char(c)) for c, _, _ in rows))
        lines = [f"{'char':<{width}}  model  sampled  (sampled: after penalties, filters and temperature "
                 f"{self.cfg.temperature})"]
        lines += [f"{show_char(c):<{width}}  {p:.3f}  {q:.3f}    {eighths_bar(p, BAR_WIDTH)}" for c, p, q in rows]
        self.write("listing", "\n".join(lines) + "\n", None)

    def cmd_undo(self) -> None:
        if not self.undo_stack:
            raise UsageError("nothing to undo")
        before, self.text = len(self.text), self.undo_stack.pop()
        self.write("info", f"undone: {before} → {len(self.text)} characters, ending {self.text[-40:]!r}", None)

    def cmd_reset(self) -> None:
        self._set(self.prompt)
        self.write("info", "back to the prompt (/undo brings the text back)", None)

    def cmd_show(self) -> None:
        self.write("listing", self.text + ("" if self.text.endswith("\n") else "\n"), None)

    def cmd_help(self) -> None:
        settings = ", ".join(f"{name} {'off' if getattr(self.cfg, field) is None else getattr(self.cfg, field)}"
                             for name, (field, _) in SETTINGS.items())
        self.write("listing", f"{HELP}\nnow: {settings}, seed {self.seed}\n", None)


# command -> (method, how many words it takes at most)
COMMANDS = {"seed": (Session.cmd_seed, 1), "top": (Session.cmd_top, 1), "undo": (Session.cmd_undo, 0),
            "reset": (Session.cmd_reset, 0), "show": (Session.cmd_show, 0), "help": (Session.cmd_help, 0)}


def _number(name: str, text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise UsageError(f"/{name} needs {what}, got {text!r}") from None


def read_lines(prompt: str = "", before: Callable[[], None] = lambda: None) -> Iterator[str]:
    """Lines from stdin until EOF, with readline's editing and history on a terminal. Ctrl-C or
    Ctrl-D at the prompt ends the lines, so the session ends as cleanly as at the end of a file."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it gives input() line editing and history
        except ImportError:
            pass
    while True:
        before()
        try:
            yield input(prompt).removesuffix("\r")  # (lines piped from a Windows file end \r\n: input() keeps the \r)
        except Terminated:
            raise
        except (EOFError, KeyboardInterrupt):
            if prompt:  # the cursor is after the prompt: the shell's own prompt starts a line of its own
                sys.stdout.write("\n")
                sys.stdout.flush()
            return
