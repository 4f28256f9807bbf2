"""Test and demo harness, not part of the product: a real multi-node Ray cluster on loopback
(:mod:`.loopback`) and the multi-node scenarios that run every job kind across it (:mod:`.multinode`,
also ``python -m lesion_ray.testing.multinode``)."""
