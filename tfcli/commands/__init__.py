"""The commands of `tfcli`, one module each; `tfcli/cli.py` makes them one Typer app.

Nothing heavy is imported at module level, so `tfcli --help` answers without loading torch.
"""
