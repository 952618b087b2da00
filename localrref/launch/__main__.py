"""``python -m localrref.launch``: see :mod:`localrref.launch.launcher`.

Nothing runs at import: with the "spawn" start method every worker starts by
re-importing the launcher's main module (multiprocessing skips ``__main__.py``
files, but keep it inert anyway).
"""

if __name__ == "__main__":
    import sys

    from localrref.launch.launcher import main

    sys.exit(main())
