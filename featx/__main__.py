"""``python -m featx``: the command line (``featx.cli``)."""

from featx.cli import main

main()
