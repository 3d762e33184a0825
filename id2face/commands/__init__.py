"""One module per `id2face` subcommand, each with ``add_arguments(parser)`` and ``run(args) -> int``.

Modules import heavy libraries inside ``run`` only, so ``id2face --help`` and ``id2face X --help``
stay fast.
"""
