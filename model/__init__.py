"""NumPy two-layer network trained with a triangular cyclical learning rate (CLR)."""
