"""The ``edgelm`` command line."""
