"""Prefect flows (installed as ``autoif.flows``): each reads like the method's step list."""
