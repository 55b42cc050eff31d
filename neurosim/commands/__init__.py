"""One module per ``neurosim`` subcommand, each thin: ``add_arguments(parser)`` and ``run(args) -> int``."""
