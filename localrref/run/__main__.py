"""``python -m localrref.run``: see :mod:`localrref.run.runner`. Inert on import."""

if __name__ == "__main__":
    import sys

    from localrref.run.runner import main

    sys.exit(main())
