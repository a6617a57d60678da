"""Subcommands of the ``cordvoice`` command line, one module each.

Each module exposes ``configure(parser: argparse.ArgumentParser) -> None`` to add its arguments and
``run(args: argparse.Namespace) -> int`` returning the exit status (commands that need asyncio call
``asyncio.run`` themselves). :mod:`cordvoice.cli` lists them and imports only the one being run.
"""
