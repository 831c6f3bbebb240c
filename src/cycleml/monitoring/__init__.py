"""Monitoring of deployed models: the prediction log, drift tests, label-free accuracy."""
