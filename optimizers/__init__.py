"""Optimiser backends shipped with calibri. Each module is a plugin registering through
``calibri_register_optimizers``; the libraries they wrap are imported only when used."""
