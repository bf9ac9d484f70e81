"""``python -m gmflow_cli`` (also ``torchrun -m gmflow_cli train ...``)."""

from gmflow_cli.main import main

if __name__ == "__main__":
    main()
