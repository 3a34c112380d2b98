"""One module per command of `python -m ipu_effnet`; see ipu_effnet/cli.py."""
