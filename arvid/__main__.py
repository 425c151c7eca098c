"""``python -m arvid``: the same as the ``arvid`` console script (for ``accelerate launch -m arvid``)."""

from arvid.cli import entry

if __name__ == "__main__":
    entry()
