"""Hand-set weights that implement each attention pattern, and the labels score_heads gives them.

The model (tfcli.model) has rotary positions and QK-norm, which shape every construction:
- QK-norm rescales each head's q and k to norm sqrt(head_dim), so a logit lies within
  ±sqrt(head_dim) and only the *direction* of q and k matters. Sharpness comes from a large
  head_dim (128 here: logits span ±11.3), not from large weights.
- Rotary positions rotate rotary pair p by position * theta_p, so q·k depends on the distance d
  between query and key as sum_p |q_p||k_p| cos(d·theta_p + phase_p). A head whose q and k are
  the same for every character is positional: its phases alone decide where it looks. A head
  that should match characters puts them in the slowest pairs, which turn by < 0.1 rad over
  the 32-character context, so a match scores the same at any distance.
- With no absolute positions, nothing in layer 0 can tell position 0 from others except its
  character. The sink here looks for a start character, as sinks in real models form on a BOS
  token; a purely positional "as far back as possible" head is tested separately.

Embeddings are one-hot (dims 0..V-1) plus a constant 1 (dim V) that positional heads read, so
their q and k are the same vector at every position.
"""

import copy

import numpy as np
import pytest
import torch

from tfcli.config import ModelConfig
from tfcli.corpus import Vocab
from tfcli.inspect import attention, probe_attention, score_heads
from tfcli.model import GPT, apply_rope, rope_angles

HEAD_DIM = 128
PAIRS = HEAD_DIM // 2
FAST = range(4)  # the four fastest rotary pairs: a peak at one distance holding 0.94+ of attention over 32
# characters (their cosines realign at some longer distances: 0.8 of the peak at 51)
VOCAB = Vocab.from_text("^abcdefghijklmnop")  # "^" only ever starts a text
V = len(VOCAB)
BIAS = V  # embedding dim that is 1 for every character
PREV = V + 1  # dims PREV..PREV+V-1: the previous character, written by layer 0 for the induction head
TEXT = "^" + "hkbgapmoeildcfn" * 2  # a start character, then a random string repeated


def blank_model(n_layer: int, n_head: int, block_size: int = 32) -> GPT:
    """A GPT with every weight zero but the embeddings: each head attends evenly until it is set."""
    cfg = ModelConfig(vocab_size=V, n_layer=n_layer, n_head=n_head, n_embd=n_head * HEAD_DIM,
                      block_size=block_size).validate()
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wte.weight[:, :V] = torch.eye(V)
        model.wte.weight[:, BIAS] = 1.0
    model.vocab = VOCAB
    return model.eval()


def pair(p: int) -> torch.Tensor:
    """Unit vector on the first coordinate of rotary pair p (pairs are (i, i + head_dim/2))."""
    e = torch.zeros(HEAD_DIM)
    e[p] = 1.0
    return e


def spread(pairs) -> torch.Tensor:
    return sum(pair(p) for p in pairs) / len(pairs) ** 0.5


def rotated(x: torch.Tensor, distance: int) -> torch.Tensor:
    """x turned by the rotary angles of `distance`: as a key, it meets the query x best `distance` back."""
    cos, sin = rope_angles(torch.tensor([distance]), HEAD_DIM)
    return apply_rope(x[None], cos, sin)[0]


def content(token: int) -> torch.Tensor:
    """A character's direction in the slowest rotary pairs, one pair each (orthogonal)."""
    return pair(PAIRS - 1 - token)


def set_head(model: GPT, layer: int, head: int, *, q=(), k=(), v=()) -> None:
    """Write (residual dim, head-space vector) terms into a head's q, k or v rows of `qkv`."""
    C = model.config.n_embd
    qkv = model.blocks[layer].attn.qkv.weight  # (3C, C): q, k, v rows, each head's HEAD_DIM rows in turn
    with torch.no_grad():
        for part, terms in enumerate((q, k, v)):
            rows = slice(part * C + head * HEAD_DIM, part * C + (head + 1) * HEAD_DIM)
            for dim, vec in terms:
                qkv[rows, dim] += vec


def positional(model: GPT, layer: int, head: int, distance: int) -> None:
    """A head that looks `distance` characters back, whatever the characters are."""
    u = spread(FAST)
    set_head(model, layer, head, q=[(BIAS, u)], k=[(BIAS, rotated(u, distance))])


def labels(model: GPT, text: str = TEXT) -> list[str]:
    att = attention(model, text)
    return [h.label for h in score_heads(att.weights, VOCAB.encode(text))]


def characters(offset: int = 0) -> list:
    """q/k terms that give each character its own content direction (read from its one-hot dim)."""
    return [(offset + t, content(t)) for t in range(V)]


def sink(model: GPT, layer: int, head: int) -> None:
    """Every query looks for the start character "^": a fixed q, a k only "^" has."""
    start = VOCAB.chars.index("^")
    set_head(model, layer, head, q=[(BIAS, content(start))], k=[(start, content(start))])


def duplicate(model: GPT, layer: int, head: int) -> None:
    """Match the query's character, minus a dip at distance 0 so that earlier copies beat itself.

    The dip is the current-character kernel over 8 fast pairs, at 0.7 of the match's weight:
    enough to put itself below every copy, small enough that the kernel's ripple at other
    distances (-0.56 to 0.79 of its peak) stays under the match (measured: 0.91+ of attention
    on copies, over 20 random strings).
    """
    dip = 0.7 * spread(range(8))
    set_head(model, layer, head, q=characters() + [(BIAS, dip)], k=characters() + [(BIAS, -dip)])


def induction(model: GPT) -> None:
    """Layer 0 head 0 (previous) copies the previous character into PREV; layer 1 head 0 matches it.

    The layer-1 query is the current character, the key the character before the key: the head
    lands on the character after an earlier copy of the current one.
    """
    positional(model, 0, 0, 1)
    set_head(model, 0, 0, v=[(t, pair(t)) for t in range(V)])
    with torch.no_grad():
        for t in range(V):
            model.blocks[0].attn.proj.weight[PREV + t, t] = 1.0  # head 0's output dim t -> residual PREV + t
    set_head(model, 1, 0, q=characters(), k=characters(offset=PREV))


@pytest.fixture(scope="module")
def zoo() -> GPT:
    """Layer 0: previous, current, sink, duplicate; layer 1: induction and three untouched heads."""
    model = blank_model(n_layer=2, n_head=4)
    induction(model)  # also makes layer 0 head 0 the previous-character head
    positional(model, 0, 1, 0)
    sink(model, 0, 2)
    duplicate(model, 0, 3)
    return model


ZOO = ["previous", "current", "first", "duplicate", "induction", "diffuse", "diffuse", "diffuse"]


def test_each_hand_built_head_gets_its_label_and_no_other_head_does(zoo):
    assert labels(zoo) == ZOO


def test_hand_built_heads_put_most_attention_on_their_pattern(zoo):
    heads = score_heads(attention(zoo, TEXT).weights, VOCAB.encode(TEXT))
    for head, name in zip(heads, ZOO[:5]):
        assert head.scores[name] > 0.9, (head.layer, head.head, head.scores)


def test_induction_head_is_found_by_the_probe(zoo):
    ids, weights = probe_attention(zoo)
    heads = score_heads(weights, ids)
    assert heads[4].label == "induction" and heads[4].scores["induction"] > 0.9
    assert [h.label for h in heads[:2]] == ["previous", "current"]  # positional heads look the same anywhere
    assert all(h.label != "induction" for h in heads[:4] + heads[5:])


def test_induction_needs_the_previous_character_from_layer_0(zoo):
    model = copy.deepcopy(zoo)
    with torch.no_grad():
        model.blocks[0].attn.proj.weight.zero_()  # layer 0 still attends, but writes nothing
    assert labels(model)[4] != "induction"


def test_positional_heads_keep_their_label_on_any_text():
    model = blank_model(n_layer=1, n_head=2)
    positional(model, 0, 0, 1)
    positional(model, 0, 1, 0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        text = "".join(rng.choice(list(VOCAB.chars), size=32))
        assert labels(model, text) == ["previous", "current"], text


def test_a_head_that_looks_as_far_back_as_it_can_is_labelled_first():
    """A sink without a start character: the only positional way to find position 0 is to prefer far keys.

    q and k are opposite on one pair turning 0.1 rad per character, so the logit rises with the
    distance over the whole 32-character context. The rise is spread over the context and
    bounded by ±sqrt(head_dim), so this sink is soft (about half the attention) and fades in
    longer contexts: under rotary positions, position 0 is special only by its content.
    """
    model = blank_model(n_layer=1, n_head=1)
    far = pair(16)  # theta_16 = 10000^(-32/128) = 0.1 rad: cos(0.1 d) falls from 1 to -1 over 31 characters
    set_head(model, 0, 0, q=[(BIAS, far)], k=[(BIAS, -far)])
    text = TEXT[1:] + "a"  # no start character
    [head] = score_heads(attention(model, text).weights, VOCAB.encode(text))
    assert head.label == "first", head.scores
