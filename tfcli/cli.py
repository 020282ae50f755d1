"""The `tfcli` command: parse options, call the library, hand results to a renderer.

Nothing heavy is imported at module level, so `tfcli --help` answers without
loading torch. Every `TfcliError` becomes one line on stderr and its exit code;
an unexpected exception does too, unless `--debug` asks for the traceback.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from .config import PRESET_NAMES, SampleConfig, TrainConfig, parse_duration, with_overrides
from .errors import INTERRUPTED, TfcliError, UsageError

app = typer.Typer(name="tfcli", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="rich",
                  help="Train a character-level transformer on any text, sample from it, and look inside it.")


class QuietConsole(Console):
    """A Console that treats a closed pipe (`| head`) as the reader being done, not as an error."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


stdout = QuietConsole(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)
_debug = False

MODEL_HELP = "Run directory or .safetensors file (default: the latest run under ./runs)."


def process_age() -> float:
    """Seconds since this process started, so a --time budget counts interpreter and import time too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def fail(message: str, code: int) -> None:
    stderr.print(Text.assemble(("error:", "bold red"), " ", message.replace("\n", " ")), soft_wrap=True)
    raise typer.Exit(code)


def stop_writing_stdout() -> None:
    """The reader went away: point fd 1 at /dev/null so the exit-time flush cannot fail."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (CliRunner, a closed stream)
        pass


def handle_errors(fn):
    """One line and an exit code for every failure a user can cause; a traceback only with --debug."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except TfcliError as e:
            fail(e.message, e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", INTERRUPTED)
        except BrokenPipeError:
            stop_writing_stdout()
            raise typer.Exit(0) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if _debug:
                raise
            fail(f"{type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)
    return wrapper


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
         version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    global _debug
    _debug = debug
    if version:
        from importlib.metadata import version as v
        print(f"tfcli {v('tfcli')}")
        raise typer.Exit(0)


# -- train ---------------------------------------------------------------------------------

class StopFlag:
    """First Ctrl-C/SIGTERM: finish the step, save, exit. Second: stop at once (saves are atomic)."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        stderr.print("\nstopping after this step (press Ctrl-C again to quit at once)…", highlight=False)

    def __enter__(self) -> StopFlag:
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _parse_time(time_: str | None) -> float | None:
    return parse_duration(time_) if time_ is not None else None


@app.command()
@handle_errors
def train(
    corpus: list[Path] = typer.Argument(..., help="Text files, or directories of text files, to train on.",
                                        show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory [default: runs/<corpus name>]."),
    val: Optional[list[Path]] = typer.Option(None, "--val", help="Validate on this file instead of the last 10%."),
    val_fraction: float = typer.Option(0.1, help="Share of the text held out for validation."),
    time_: Optional[str] = typer.Option(None, "--time", help="Wall-clock budget: 300, 90s, 5m, 1h30m [default: 5m]."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    preset: str = typer.Option("auto", help=f"Model size: {', '.join(PRESET_NAMES)} (auto: by device and --time)."),
    n_layer: Optional[int] = typer.Option(None, help="Transformer blocks."),
    n_head: Optional[int] = typer.Option(None, help="Attention heads per block."),
    n_embd: Optional[int] = typer.Option(None, help="Width of the residual stream."),
    block_size: Optional[int] = typer.Option(None, help="Context length in characters."),
    dropout: Optional[float] = typer.Option(None, help="Dropout rate [default: 0]."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per step."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    seed: int = typer.Option(1337, help="Random seed (initialisation and batches)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16 (autocast precision)."),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the model."),
    eval_interval: Optional[float] = typer.Option(None, help="Seconds between validations [default: 30]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out up to the budget now given."),
    encoding: str = typer.Option("utf-8", help="Text encoding of the corpus files."),
    errors: str = typer.Option("strict", help="On undecodable bytes: strict (refuse) or replace."),
) -> None:
    """Train a model on CORPUS; progress live on a terminal, log lines in a pipe."""
    started_at = time.monotonic() - process_age()
    budget = _parse_time(time_)
    if budget is None and max_steps is None:
        budget = parse_duration("5m")
    if errors not in ("strict", "replace"):
        raise UsageError(f"--errors must be strict or replace, got {errors!r}")
    from . import checkpoint as ckpt
    from .config import ModelConfig, resolve_preset
    from .corpus import load_corpus
    from .device import pick_device

    run_dir, vocab, base_model, base_train = out, None, None, None
    if resume:
        run_dir = run_dir or ckpt.RUNS_DIR / (corpus[0].stem or "corpus")
        stored = ckpt.load_checkpoint(ckpt.resolve_model_path(run_dir)) if (run_dir / ckpt.MODEL_FILE).exists() \
            else None
        if stored is None:
            raise UsageError(f"{run_dir}: no run to resume there; drop --resume to start one")
        vocab, base_model = stored.vocab, stored.config
        base_train = TrainConfig(**{k: v for k, v in stored.summary.get("train", {}).items()
                                    if k in TrainConfig.__dataclass_fields__})
    elif run_dir is None:
        run_dir = ckpt.default_run_dir(corpus)
    elif (run_dir / ckpt.MODEL_FILE).exists():
        raise UsageError(f"{run_dir} already holds a run; add --resume to continue it, or pick another --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file; give a directory for the run")

    data = load_corpus(corpus, val, val_fraction, encoding, errors, vocab=vocab)
    print_corpus_report(corpus, data)
    if base_model is None:
        picked = resolve_preset(preset, pick_device(device).type, budget)
        base_train = TrainConfig(batch_size=picked.pop("batch_size"), lr=picked.pop("lr"))
        base_model = ModelConfig(vocab_size=len(data.vocab), **picked)
    model_cfg = with_overrides(base_model, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                               dropout=dropout).validate()
    train_cfg = with_overrides(base_train, batch_size=batch_size, lr=lr, eval_interval=eval_interval)
    train_cfg = with_overrides(train_cfg, seed=seed, device=device, dtype=dtype, compile=compile_)
    train_cfg = TrainConfig(**{**train_cfg.to_dict(), "max_steps": max_steps, "time_budget": budget}).validate()

    from .render.progress import LiveProgress, PlainProgress
    from .trainer import train as run_training

    view = LiveProgress(stdout) if stdout.is_terminal else PlainProgress(stdout)
    with StopFlag() as stop, view:
        done = run_training(data, model_cfg, train_cfg, run_dir, view, resume=resume, should_stop=stop,
                            started_at=started_at)
    if done.reason == "interrupted":
        args = " ".join(str(p) for p in corpus)
        stderr.print(f"checkpoint saved at step {done.step}; continue with:\n"
                     f"  tfcli train {args} --out {run_dir} --resume", highlight=False, markup=False)
        raise typer.Exit(128 + (stop.signum or signal.SIGINT))


def print_corpus_report(paths: list[Path], data) -> None:
    names = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    stdout.print(f"corpus: {names}: {data.n_chars:,} chars, vocab {len(data.vocab)}; "
                 f"train {len(data.train):,} / val {len(data.val):,}", highlight=False, markup=False)


# -- sample --------------------------------------------------------------------------------

def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        if str(prompt_file) == "-":
            return sys.stdin.read()
        try:
            return prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{prompt_file}: cannot read prompt ({getattr(e, 'strerror', None) or e})") from None
    if prompt == "-":
        return sys.stdin.read()
    return prompt or ""


def fit_prompt(vocab, prompt: str, unknown: str) -> str:
    """Apply the --unknown policy; error (default) names the characters the model never saw."""
    missing = vocab.unknown(prompt)
    if not missing or unknown == "error":
        vocab.encode(prompt) if missing else None
        return prompt
    from .corpus import show_char
    if unknown == "skip":
        stderr.print(f"warning: dropped unknown characters: {' '.join(show_char(c) for c in missing)}",
                     markup=False)
        return "".join(c for c in prompt if c not in missing)
    mapping = {c: vocab.closest(c) for c in missing}
    stderr.print("warning: replaced unknown characters: " + ", ".join(
        f"{show_char(c)}→{show_char(r) if r else '(dropped)'}" for c, r in mapping.items()), markup=False)
    return "".join(mapping.get(c, c) or "" for c in prompt)


def load(model_path: Path | None, device: str = "cpu"):
    from .checkpoint import load_model
    model = load_model(model_path, device)
    if model_path is None:
        stderr.print(f"using {model.path.parent}", style="dim", highlight=False, markup=False)
    return model


@app.command()
@handle_errors
def sample(
    model_path: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue ('-': read stdin)."),
    prompt_file: Optional[Path] = typer.Option(None, help="Read the prompt from a file ('-': stdin)."),
    max_new_tokens: int = typer.Option(500, "--max-new-tokens", "-n", help="Characters to generate."),
    temperature: float = typer.Option(0.8, "--temperature", "--temp", help="0 = greedy (argmax)."),
    top_k: Optional[int] = typer.Option(None, help="Keep the k most likely characters."),
    top_p: Optional[float] = typer.Option(None, help="Keep the smallest set with this much probability."),
    min_p: Optional[float] = typer.Option(None, help="Drop characters below min-p times the top probability."),
    repeat_penalty: float = typer.Option(1.0, help="Penalise characters seen in the last --repeat-last-n."),
    repeat_last_n: int = typer.Option(64, help="How far back the penalties look."),
    presence_penalty: float = typer.Option(0.0, help="Subtract once from every recently seen character."),
    frequency_penalty: float = typer.Option(0.0, help="Subtract per recent occurrence."),
    seed: Optional[int] = typer.Option(None, help="Random seed [default: random, printed]."),
    num_samples: int = typer.Option(1, help="Samples to generate, as one batch."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop at this string (repeatable; not printed)."),
    unknown: str = typer.Option("error", help="Unknown prompt characters: error, skip or replace."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print characters as they come."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per sample."),
    device: str = typer.Option("cpu", help="cpu, cuda or mps."),
) -> None:
    """Generate text from a trained model.

    Filters apply in this order: repeat/presence/frequency penalties, top-k, top-p, min-p, then temperature.
    """
    from .sampling import generate, new_seed

    if unknown not in ("error", "skip", "replace"):
        raise UsageError(f"--unknown must be error, skip or replace, got {unknown!r}")
    cfg = SampleConfig(max_new_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
                       presence_penalty, frequency_penalty, seed, num_samples, tuple(stop or ())).validate()
    text = read_prompt(prompt, prompt_file)
    model = load(model_path, device)
    text = fit_prompt(model.vocab, text, unknown)
    if cfg.seed is None:
        cfg = with_overrides(cfg, seed=new_seed())
        stderr.print(f"seed {cfg.seed}", style="dim", highlight=False)
    steps = generate(model, model.vocab, text, cfg)
    if as_json:
        outs = ["".join(parts) for parts in zip(*steps)] if cfg.max_new_tokens else [""] * cfg.num_samples
        settings = {k: v for k, v in cfg.__dict__.items()}
        for out in outs:
            print(json.dumps({"prompt": text, "text": out, "seed": cfg.seed, "settings": settings}))
        return
    if cfg.num_samples == 1 and stream:
        stream_one(text, (parts[0] for parts in steps))
        return
    outs = ["".join(parts) for parts in zip(*steps)] if cfg.max_new_tokens else [""] * cfg.num_samples
    for i, out in enumerate(outs):
        if cfg.num_samples > 1:
            stdout.rule(f"sample {i + 1}/{cfg.num_samples}", style="dim")
        stdout.print(text, style="bold", end="", markup=False, soft_wrap=True)
        stdout.print(out, markup=False, soft_wrap=True)


def stream_one(prompt: str, pieces) -> None:
    stdout.print(prompt, style="bold", end="", markup=False, soft_wrap=True)
    for piece in pieces:
        if piece:
            stdout.print(piece, end="", markup=False, soft_wrap=True)
            stdout.file.flush()
    stdout.print()


# -- inspect-attention -----------------------------------------------------------------------

VIEWS = ("grid", "head", "focus")


@app.command("inspect-attention")
@handle_errors
def inspect_attention(
    model_path: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to look at ('-': read stdin)."),
    prompt_file: Optional[Path] = typer.Option(None, help="Read the prompt from a file ('-': stdin)."),
    view: Optional[str] = typer.Option(None, help="grid (all heads of a layer), head (one head), focus (one query)."),
    layer: Optional[int] = typer.Option(None, help="Layer to show (negative counts from the end) [default: last]."),
    head: Optional[int] = typer.Option(None, help="Head to show (with --view head) [default: 0]."),
    at: Optional[int] = typer.Option(None, help="Query position for --view focus [default: last]."),
) -> None:
    """Show what the attention heads look at, as heatmaps in the terminal.

    Attention weights show where information can flow, not why the model predicts what it does:
    read them as a hint, not an explanation.
    """
    from .inspect import attention
    from .render import heatmap

    view = view or ("head" if head is not None else "grid")
    if view not in VIEWS:
        raise UsageError(f"--view must be one of {', '.join(VIEWS)}, got {view!r}")
    text = read_prompt(prompt, prompt_file)
    model = load(model_path)
    text = fit_prompt(model.vocab, text, "error")
    att = attention(model, text)
    L, H = att.weights.shape[:2]
    if att.offset:
        stderr.print(f"note: the prompt is longer than the context ({model.config.block_size}); "
                     f"showing its last {len(att.text)} characters", highlight=False)
    li = _index(layer if layer is not None else -1, L, "--layer")
    color = stdout.color_system is not None and not stdout.no_color  # NO_COLOR: shades, not uniform blocks
    width = stdout.width
    if view == "grid":
        shown = att.weights[li:li + 1] if layer is not None or L > 1 else att.weights
        out = heatmap.grid_view(shown, att.text, layer_labels=[li], color=color, max_width=width)
    elif view == "head":
        hi = _index(head or 0, H, "--head")
        out = heatmap.head_view(att.weights[li, hi], att.text, title=f"layer {li}, head {hi}", color=color,
                                max_width=width, offset=att.offset)
    else:
        pos = _index(at if at is not None else -1, len(att.text), "--at")
        out = heatmap.focus_view(att.weights, att.text, pos, color=color)
    stdout.print(out)


def _index(i: int, n: int, flag: str) -> int:
    if not -n <= i < n:
        raise UsageError(f"{flag} {i} is out of range: there are {n} (0 to {n - 1})")
    return i % n


# -- eval, info ------------------------------------------------------------------------------

@app.command("eval")
@handle_errors
def eval_(
    file: list[Path] = typer.Argument(..., help="Held-out text files.", show_default=False),
    model_path: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    batch_size: int = typer.Option(32, help="Windows scored at once."),
    as_json: bool = typer.Option(False, "--json", help='Print {"chars", "loss", "bpc", "perplexity"}.'),
    device: str = typer.Option("cpu", help="cpu, cuda or mps."),
    encoding: str = typer.Option("utf-8", help="Text encoding of the files."),
) -> None:
    """Loss on held-out text: every character scored once, in windows of the model's context."""
    from tqdm import tqdm

    from .corpus import read_text, show_char
    from .evaluation import evaluate

    text = read_text(file, encoding)
    model = load(model_path, device)
    missing = model.vocab.unknown(text)
    if missing:
        raise UsageError(f"{', '.join(map(str, file))}: has characters the model never saw "
                         f"({' '.join(show_char(c) for c in missing[:10])}); evaluate on text like its corpus")
    ids = model.vocab.encode(text)
    if len(ids) < 2:
        raise UsageError("need at least two characters to evaluate")
    with tqdm(total=len(ids) - 1, unit="char", unit_scale=True, disable=not sys.stderr.isatty(),
              desc="eval", leave=False) as bar:
        result = evaluate(model, ids, batch_size, on_progress=bar.update)
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        stdout.print(f"{result.chars:,} chars: loss {result.loss:.4f} nats/char, {result.bpc:.4f} bits/char, "
                     f"perplexity {result.perplexity:.3f}")


@app.command()
@handle_errors
def info(
    model_path: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What a checkpoint holds: its config, size, vocabulary and training summary."""
    model = load(model_path)
    record = {"path": str(model.path), "params": model.num_params(), "config": model.config.to_dict(),
              "vocab": model.vocab.chars, "summary": model.summary}
    if as_json:
        print(json.dumps(record))
        return
    from .render.heatmap import visible
    c, s = model.config, model.summary
    stdout.print(Text(str(model.path), style="bold"))
    stdout.print(f"  {model.num_params():,} parameters: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, "
                 f"context {c.block_size}, vocabulary {c.vocab_size}")
    stdout.print("  vocabulary: " + "".join(visible(ch) for ch in model.vocab.chars), markup=False)
    if s.get("step") is not None:
        val = f", val loss {s['val_loss']:.4f}" if s.get("val_loss") is not None else ""
        stdout.print(f"  trained {s['step']} steps, {s.get('tokens', 0):,} tokens, {s.get('seconds', 0)} s{val}")


def run() -> None:
    app()
