"""Fixtures shared by tests/core and tests/_napari."""

import pytest
from prior_helpers import CallCountingPrior

from napari_ebm.priors import PRIORS


@pytest.fixture
def register_prior():
    """Return a function ``register(name, prior_class, description=None)`` that registers a test prior.

    ``register`` uses the first line of the class docstring as the default description, resets
    ``total_calls`` of a ``CallCountingPrior`` subclass to 0 and returns ``name``. Every name it
    registers is unregistered when the test ends, whether the test passed or failed.
    """
    names = []

    def register(name, prior_class, description=None):
        if description is None:
            description = prior_class.__doc__.strip().splitlines()[0]
        if issubclass(prior_class, CallCountingPrior):
            prior_class.total_calls = 0
        PRIORS.register(name, description)(prior_class)
        names.append(name)
        return name

    yield register
    for name in names:
        PRIORS.unregister(name)
