"""tfcli: train a character-level transformer on any text, sample from it, look inside it.

The library is what the CLI is made of, usable from a notebook:

    import tfcli
    from pathlib import Path
    corpus = tfcli.load_corpus([Path("input.txt")])
    tfcli.train(corpus, tfcli.ModelConfig(), tfcli.TrainConfig(max_steps=500), Path("runs/x"))
    model = tfcli.load("runs/x")
    text = model.generate("ROMEO:", 300, temperature=0.7, seed=1)
    att = tfcli.attention(model, "To be, or not to be")

Names resolve lazily so that importing tfcli (and `tfcli --help`) does not load torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "config", "TrainConfig": "config", "SampleConfig": "config", "preset": "presets",
    "load_corpus": "corpus", "Vocab": "corpus",
    "train": "trainer", "load": ("checkpoint", "load_model"), "generate": "sampling",
    "attention": "inspect", "evaluate": "evaluation", "TfcliError": "errors", "UsageError": "errors",
    "errors": None,
    # what train's on_event hears
    "Start": "events", "Step": "events", "Eval": "events", "Sample": "events", "Notice": "events",
    "Done": "events",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tfcli' has no attribute {name!r}")
    from importlib import import_module
    target = _EXPORTS[name]
    if target is None:  # a module: tfcli.errors, whose exceptions a caller catches
        return import_module(f".{name}", __name__)
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(import_module(f".{module}", __name__), attr)


__all__ = list(_EXPORTS)


def __dir__() -> list[str]:  # (dir(), help() and a notebook's completion list the lazy names too)
    return sorted(set(globals()) | set(__all__))
