"""The ``isthmus`` command line: run the server and manage it over its REST API.

The entry point is :func:`isthmus.cli.main.main`. Importing this package does no work: the
configuration is read, and the server contacted, only when a command runs.
"""
