"""Test priors that misbehave on a chosen evaluation, shared by tests/core and tests/_napari.

Test modules import this module by its bare name: tests/conftest.py puts tests/ on ``sys.path``
because tests/ has no ``__init__.py`` (pytest's default "prepend" import mode).
"""

from napari_ebm.priors import Prior


class CallCountingPrior(Prior):
    """The l2 energy ||x||^2 / 2, which counts its evaluations and passes each one to ``on_call``.

    ``calls`` counts the evaluations of one instance. The class attribute ``total_calls`` counts the
    evaluations of all instances of a subclass, so a test can read it while a run's worker thread
    evaluates an instance that the test cannot reach. ``register_prior`` resets it to 0.
    """

    total_calls = 0

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        type(self).total_calls += 1
        return self.on_call(self.calls, x, 0.5 * (x * x).sum())

    def on_call(self, calls, x, energy):
        """Return the energy of evaluation number ``calls`` (counted from 1).

        Subclasses override this to raise, warn, sleep or change ``energy`` on chosen evaluations.
        A warning issued here needs ``stacklevel=3`` to point at the caller of ``forward``.
        """
        return energy

