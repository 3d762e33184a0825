"""Plug-in components, one module per role; each variant registered by short name."""
