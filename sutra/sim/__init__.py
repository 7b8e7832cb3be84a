"""The simulator twin: Sutra's own scheduler against a cost model fitted from a measured profile."""
