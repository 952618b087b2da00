"""The module ``__getattr__`` of torch's names that localrref does not provide under the runner."""

from __future__ import annotations

__all__ = ["refuse"]


def refuse(module: str, why: str):
    """A ``__getattr__`` for ``module`` whose error names the missing attribute.

    ``why`` follows "this program runs under `python -m localrref.run`, ";
    ``{name}`` in it is the attribute's full name.
    """
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{module}.{name}"
        raise AttributeError(f"{full} is not provided by localrref: this program runs under "
                             f"`python -m localrref.run`, {why.format(name=full)}")
    return __getattr__
