"""``python -m segflow.flows`` (or ``python -m flows`` in a checkout) runs ``segflow``."""

from segflow.flows.cli import main

if __name__ == "__main__":
    main()
