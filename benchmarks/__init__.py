"""Benchmarks of cssl (``cssl bench ...``), kept out of the engine: they drive ``cssl_core``
exactly as production does and add datasets, timing and reporting around it."""
