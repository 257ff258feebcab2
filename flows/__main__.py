"""``python -m flows`` runs the ``segflow`` command."""

from flows.cli import main

if __name__ == "__main__":
    main()
