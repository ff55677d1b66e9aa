"""Data: the sources and their fixed splits
(:mod:`.sources`), which images each worker sees (:mod:`.sampler`), per-image randomness
(:mod:`.rng`), the views (:mod:`.transforms`) and the patch masks (:mod:`.masking`)."""
