"""id2face: ID²Face, identity-decoupled diffusion for face anonymization.

Importing the package is cheap; torch, lightning and diffusers load with the modules that need them.
"""
__version__ = "0.1.0"
