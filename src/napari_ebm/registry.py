"""Name registries for forward operators and energy priors.

Operators and priors are looked up by name from the command line, the napari widget and scripts,
so that a new one becomes available everywhere by registering it once.
"""

import logging

from .errors import ParameterError

logger = logging.getLogger(__name__)


class Registry:
    """A mapping from names to factories, with a clear error for unknown names.

    Parameters
    ----------
    kind : str
        What the registry contains ("prior", "operator"), used in error messages.
    """

    def __init__(self, kind):
        self.kind = kind
        self._factories = {}
        self._descriptions = {}

    def register(self, name, description=""):
        """Return a decorator that registers a factory under ``name``.

        Raises
        ------
        ValueError
            If ``name`` is already registered.
        """

        def decorator(factory):
            if name in self._factories:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            self._factories[name] = factory
            self._descriptions[name] = description or (factory.__doc__ or "").strip().split("\n")[0]
            logger.debug("registered %s %r", self.kind, name)
            return factory

        return decorator

    def unregister(self, name):
        """Remove ``name`` from the registry; unknown names are ignored."""
        self._factories.pop(name, None)
        self._descriptions.pop(name, None)

    def create(self, name, **kwargs):
        """Create the registered object ``name`` with keyword arguments ``kwargs``.

        Raises
        ------
        ParameterError
            If ``name`` is not registered. The message lists the registered names.
        """
        try:
            factory = self._factories[name]
        except KeyError:
            choices = ", ".join(sorted(self._factories))
            raise ParameterError(f"unknown {self.kind} {name!r}; choose one of: {choices}") from None
        return factory(**kwargs)

    def names(self):
        """Return the registered names, sorted."""
        return sorted(self._factories)

    def describe(self, name):
        """Return the one-line description of ``name``."""
        return self._descriptions[name]

    def __contains__(self, name):
        return name in self._factories
