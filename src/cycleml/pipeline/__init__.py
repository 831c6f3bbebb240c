"""Continuous training: new data → train → export → gate → register → promote."""
