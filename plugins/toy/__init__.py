"""The toy text-to-image world: procedural scenes, an oracle reward, a small trained DiT.

It makes Calibri runnable end to end on a laptop CPU: the shipped model (``model: toy``) is a
real diffusers ``SD3Transformer2DModel`` trained on this world, so calibration has something to
improve, and the oracle scores images with code instead of a learned reward model.
"""
