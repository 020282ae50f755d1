"""`tfcli inspect-attention`: which view the options ask for, the attention to draw, and an export.

The numbers come from tfcli/inspect.py and the pictures from tfcli/render/; this module only
checks options and connects the two.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer

from ..errors import TfcliError, UsageError
from .common import MODEL_HELP, fit_prompt, handle_errors, load_native, print_view, read_prompt, stderr, stdout

VIEWS = ("head", "grid", "focus", "summary", "lens", "generated")


# Which views each option changes; giving one elsewhere is an error, not silently ignored.
APPLIES = {"--layer": ("head", "grid", "focus", "summary", "generated"), "--head": ("head", "generated"),
           "--at": ("focus", "lens"), "--aggregate": ("head", "generated"),
           "--generate": ("generated",), "--seed": ("generated",),
           "--range": ("head", "grid", "focus", "summary", "lens")}


DEFAULT_GENERATE = 20


def _pick_view(view: str | None, given: dict[str, object]) -> str:
    """--view, or the view the other options imply; then check every given option applies to it."""
    if view is None:
        implied = [v for flag, v in (("--generate", "generated"), ("--at", "focus"), ("--head", "head"),
                                     ("--aggregate", "head")) if given[flag] is not None]
        view = implied[0] if implied else "grid"
    if view not in VIEWS:
        raise UsageError(f"--view must be one of {', '.join(VIEWS)}, got {view!r}")
    for flag, value in given.items():
        if flag == "--seed" and value is not None and view != "generated":  # (given only with a prompt)
            raise UsageError("--seed does nothing with --prompt: it picks the text the model writes when no prompt "
                             "is given, or what --view generated writes")
        if value is not None and view not in APPLIES[flag]:
            views = APPLIES[flag]
            listed = " and ".join(views) if len(views) < 3 else f"{', '.join(views[:-1])} and {views[-1]}"
            raise UsageError(f"{flag} does not apply to --view {view} (only to {listed})")
    return view


def _index(i: int, n: int, flag: str) -> int:
    if not -n <= i < n:
        raise UsageError(f"{flag} {i} is out of range: there are {n} (0 to {n - 1}, or -{n} to -1 from the last)")
    return i % n


def _parse_range(spec: str, offset: int, total: int) -> tuple[int, int]:
    """--range A:B (prompt positions, B excluded, negative counts from the end) as indices into the seen text."""
    match = re.fullmatch(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*", spec)
    if not match:
        raise UsageError(f"--range must look like A:B (e.g. 10:40, :20, -30:), got {spec!r}")
    end = offset + total
    a, b = (None if g is None else int(g) + end * (int(g) < 0) for g in match.groups())
    if a is not None and b is not None and not a < b:
        raise UsageError(f"--range {spec} is empty: A must come before B")
    a, b = 0 if a is None else a, end if b is None else b
    a, b = max(offset, a), min(end, b)  # clamped to what the model saw, as a slice is to its sequence
    if not a < b:
        seen = f"{offset} to {end - 1}" + (" (earlier ones are past the context)" if offset else "")
        raise UsageError(f"--range {spec} selects no positions the model saw: it saw positions {seen}")
    return a - offset, b - offset


def _query(at: int | None, offset: int, n: int) -> int:
    """--at (a prompt position, or negative from the end) as an index into the n characters shown."""
    if at is None:
        return n - 1
    i = at - offset if at >= 0 else at + n
    if not 0 <= i < n:
        raise UsageError(f"--at {at} is out of range: the positions shown are {offset} to {offset + n - 1}")
    return i


def _check_export(path: Path | None) -> None:
    from ..render.attention_views import EXPORT_SUFFIXES

    if path is None:
        return
    if path.suffix.lower() not in EXPORT_SUFFIXES:
        raise UsageError(f"--export {path}: unknown suffix; use {', '.join(EXPORT_SUFFIXES)}")
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise UsageError(f"--export {path}: {path.parent} {what}")
    if path.is_dir():
        raise UsageError(f"--export {path} is a directory: name a file in it")


def _write_export(path: Path, renderable, record: dict, width: int) -> None:
    from ..checkpoint import atomic_write
    from ..render.attention_views import export

    try:
        if path.suffix.lower() == ".json":
            atomic_write(path, json.dumps(record).encode("utf-8"))
        else:
            export(renderable, path, width=width, title=f"tfcli inspect-attention: {record['text'][:40]}")
    except OSError as e:  # (the request was checked before the work: this is the disk's answer)
        raise TfcliError(f"--export {path}: cannot write ({e.strerror or e})") from None
    stderr.print(f"wrote {path}", style="dim", highlight=False, markup=False)


def _export_record(view: str, att, window: tuple[int, int], layers: list[int], heads: list[int]) -> dict:
    """The weights drawn, for --export: queries as rows (from text[first_query] on), as columns every
    key they saw. --range cuts a head or grid view's keys as it cuts its queries; focus, summary and
    lens views keep all the keys before (their rows then sum to 1); a generated view is all its text."""
    start, stop = window
    first, text, weights, offset = 0, att.text[start:stop], att.weights[..., start:stop, start:stop], att.offset + start
    if view == "generated":
        text, weights, offset = att.text, att.weights, att.offset
    elif view in ("focus", "summary", "lens"):
        text, weights, offset, first = att.text[:stop], att.weights[..., start:stop, :stop], att.offset, start
    return {"text": text, "offset": offset, "first_query": first, "layers": layers, "heads": heads,
            "weights": weights[layers][:, heads].round(6).tolist()}


def _summary_view(model, att, start: int, stop: int, layers: list[int], color: bool, width: int):
    """Head patterns scored on the queries in [start, stop) of the text the model saw, each over
    all the keys it saw (a --range picks queries; cutting keys skewed every score)."""
    from ..inspect import THRESHOLD, probe_attention, score_heads
    from ..render.attention_views import summary_view

    ids = model.vocab.encode(att.text[:stop])
    probe, probe_weights = probe_attention(model)
    on_prompt = score_heads(att.weights[layers][..., :stop, :stop], ids, layers=layers, first_query=start)
    on_probe = score_heads(probe_weights[layers], probe, layers=layers)
    whole = (start, stop) == (0, len(att.text))
    scope = "on the prompt" if whole else f"from positions {att.offset + start}:{att.offset + stop} of the prompt"
    return summary_view(on_prompt, on_probe, att.text[start:stop], len(probe) // 2, THRESHOLD, color=color,
                        max_width=width, scope=scope)


def _generation(model, text: str, n: int, seed: int | None):
    from ..inspect import generation_attention
    from ..sampling import new_seed

    if n < 1:
        raise UsageError(f"--generate must be at least 1, got {n}")
    if seed is None or seed == -1:
        seed = new_seed()
        stderr.print(f"seed {seed}", style="dim", highlight=False)
    return generation_attention(model, text, n, seed)


def _generated_view(gen, layer: int | None, head: int | None, how: str | None, color: bool, width: int):
    from ..inspect import aggregate
    from ..render.attention_views import generated_view

    how = how or "mean"
    layers = slice(None) if layer is None else slice(layer, layer + 1)
    heads = slice(None) if head is None else slice(head, head + 1)
    over = [name for name, given in (("layers", layer), ("heads", head)) if given is None]
    where = ", ".join([f"layer {layer}"] * (layer is not None) + [f"head {head}"] * (head is not None)
                      + [f"{how} over all {' and '.join(over)}"] * bool(over))
    weights = [aggregate(s.weights[layers, heads], how, (0, 1)) for s in gen.steps]
    return generated_view(gen, weights, where, color=color, max_width=width)


def _own_prompt(model, view: str, seed: int | None, layer: int) -> tuple[str, int]:
    """Without --prompt: text the model writes (the generated view starts from its first character),
    as long as the heatmap shows at this width: a longer one hid its start, where the top rows'
    attention went."""
    from ..inspect import OWN_TEXT, opening, own_text
    from ..render.heatmap import positions_shown
    from ..sampling import new_seed

    seed = new_seed() if seed is None or seed == -1 else seed
    if view == "generated":  # (the seed said, as every other view says it: the run could not be repeated)
        stderr.print(f"note: no --prompt given: the model writes from its first character (seed {seed}; "
                     "--prompt TEXT to choose)", highlight=False)
        return opening(model.vocab), seed
    text = own_text(model, seed, positions_shown(view, layer, model.config.n_head, stdout.width) or OWN_TEXT)
    stderr.print(f"note: no --prompt given: looking at text the model wrote (seed {seed}; --prompt TEXT to choose)",
                 highlight=False)
    return text, seed


@handle_errors(builds=("decode_attention.c", "decode_matmul.c"), torch=False)  # (--view generated samples)
def inspect_attention(
    model_path: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to look at ('-': read stdin)."),
    prompt_file: Optional[Path] = typer.Option(None, help="Read the prompt from a file ('-': stdin)."),
    view: Optional[str] = typer.Option(
        None, help="head (one head), grid (every layer x head; without --view, the last layer's heads), focus (where "
        "each head looks from one position), summary (each head's pattern), lens (logit lens), generated "
        "(attention behind sampled text)."),
    layer: Optional[int] = typer.Option(None, help="Layer to show (negative counts from the end) \\[default: last; "
                                        "all for --view grid, focus, summary and generated]."),
    head: Optional[int] = typer.Option(None, help="Head to show (head, generated) \\[default: 0 / all]."),
    at: Optional[int] = typer.Option(None, help="Position of the query for focus and lens \\[default: last]."),
    generate_: Optional[int] = typer.Option(None, "--generate", help=f"Characters to sample for --view generated "
                                            f"\\[default: {DEFAULT_GENERATE}]."),
    seed: Optional[int] = typer.Option(None, help="Random seed for --generate, and for the text a call without "
                                       "--prompt writes; -1: random \\[default: random, printed]."),
    aggregate_: Optional[str] = typer.Option(None, "--aggregate", help="Combine heads, mean or max: a layer's "
                                                 "(head view), or all layers' (generated view)."),
    range_: Optional[str] = typer.Option(None, "--range", help="Prompt positions A:B to show (B excluded)."),
    export: Optional[Path] = typer.Option(None, help="Also write the view to FILE: .svg, .html, or .json "
                                          "(the raw weights)."),
    unknown: str = typer.Option("error", help="Unknown prompt characters: error, skip or replace (as in sample)."),
) -> None:
    """Show what the attention heads look at, as heatmaps in the terminal.

    Attention weights show where information can flow, not why the model predicts what it does:
    read them as a hint, not an explanation.
    """
    from ..corpus import check_unknown
    from ..inspect import aggregate, attention, logit_lens
    from ..render import attention_views, heatmap

    own = prompt is None and prompt_file is None  # the model writes the text to look at (--seed picks it)
    given = {"--layer": layer, "--head": head, "--at": at, "--aggregate": aggregate_, "--generate": generate_,
             "--seed": None if own else seed, "--range": range_}
    explicit, view = view, _pick_view(view, given)
    if aggregate_ is not None and aggregate_ not in ("mean", "max"):
        raise UsageError(f"--aggregate must be mean or max, got {aggregate_!r}")
    if aggregate_ is not None and head is not None:
        raise UsageError("--aggregate combines all of a layer's heads; give it or --head, not both")
    _check_export(export)
    check_unknown(unknown)
    text = read_prompt(prompt, prompt_file)
    model = load_native(model_path)  # (its forward in numpy: no torch to import)
    L, H = model.config.n_layer, model.config.n_head
    li = _index(layer, L, "--layer") if layer is not None else None  # (checked before any text is written)
    hi = _index(head, H, "--head") if head is not None else None
    if own:
        text, seed = _own_prompt(model, view, seed, L - 1 if li is None else li)
    typed, text = text, fit_prompt(model.vocab, text, unknown, " (or pass --unknown skip|replace)")
    if typed and not text:
        raise UsageError("nothing is left of the prompt once its unknown characters are dropped")
    att = attention(model, text)
    if att.offset and view != "generated":
        stderr.print(f"note: the prompt is longer than the context ({model.config.block_size}); "
                     f"showing its last {len(att.text)} characters", highlight=False)
    start, stop = _parse_range(range_, att.offset, len(att.text)) if range_ else (0, len(att.text))
    chars, weights, offset = att.text[start:stop], att.weights[..., start:stop, start:stop], att.offset + start
    layers = list(range(L)) if li is None else [li]
    color = stdout.color_system is not None and not stdout.no_color  # NO_COLOR: shades, not uniform blocks
    width = stdout.width
    pos = _query(at, offset, len(chars))
    lens = logit_lens(model, att.text, start + pos) if view == "lens" else None
    if view == "generated":
        gen = _generation(model, text, DEFAULT_GENERATE if generate_ is None else generate_, seed)
        att = attention(model, gen.text)

    # the layers drawn: a bare grid, and a head view without --layer, show the last one
    shown = [L - 1] if li is None and (view == "head" or view == "grid" and explicit != "grid") else layers

    def draw(color: bool):
        if view == "grid":
            return heatmap.grid_view(weights[shown], chars, layer_labels=shown, color=color, max_width=width,
                                     offset=offset, first_sees_itself=start == 0)
        if view == "head":
            layer_ = shown[0]
            if aggregate_:
                w, title = aggregate(weights[layer_], aggregate_, 0), f"layer {layer_}, {aggregate_} over {H} heads"
            else:
                w, title = weights[layer_, hi or 0], f"layer {layer_}, head {hi or 0}"
            return heatmap.head_view(w, chars, title=title, color=color, max_width=width, offset=offset,
                                     first_sees_itself=start == 0)
        if view == "focus":  # --range bounds the query; its keys are all it saw
            return heatmap.focus_view(att.weights[layers], att.text, start + pos, color=color, layer_labels=layers,
                                      offset=att.offset, max_width=width)
        if view == "summary":
            return _summary_view(model, att, start, stop, layers, color, width)
        if view == "lens":
            return attention_views.lens_view(lens, att.text, offset=att.offset, color=color,
                                             max_width=width)
        return _generated_view(gen, li, hi, aggregate_, color, width)

    print_view(draw(color))
    if start and view in ("head", "grid"):  # (a row that looked only before the range reads as blank)
        stderr.print(f"note: --range shows the keys from position {offset} on; attention to earlier ones is not "
                     "drawn, so a row's shares can add up to less than 1", highlight=False)
    if export is not None:  # in colour wherever stdout goes: a file is looked at elsewhere
        heads = list(range(H)) if aggregate_ or (hi is None and view != "head") else [hi or 0]  # (a head view: its one)
        _write_export(export, draw(True), _export_record(view, att, (start, stop), shown, heads), width)
