"""``python -m relaygraph.cli``."""

from relaygraph.cli import main

main()
