"""Ops: each file holds an op's math and its eager reference twin, with the dispatch to its Triton kernel where it
has one (``actnorm`` and the LU algebra of ``invconv`` have none: they run inside the fused ``actnorm_invconv``
and ``channel_mix``)."""
