"""The gmflow command line (Typer): the only package that knows argv, exit codes, terminals."""
