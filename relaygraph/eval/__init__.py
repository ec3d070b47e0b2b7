"""Evaluation: datasets, answer checking, and the experiments built on them — policy
sweeps (:mod:`.sweep`, :mod:`.metrics`), the reasoning relay (:mod:`.relay_experiment`)
and the off-trajectory twin tests (:mod:`.twins`); ``relaygraph eval`` (:mod:`.cli`)."""
