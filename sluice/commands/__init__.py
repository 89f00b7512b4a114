"""One module per ``sluice`` command: ``add_arguments(parser)`` and ``run(args) -> int``."""
