"""The gmflow command line (Typer). The only package that knows about argv, exit codes and terminals."""
