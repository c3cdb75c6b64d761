"""Data: downloads and the toy generator to TSM frame folders, and the dataset (docs/architecture.md).
Import the submodules directly; this package imports nothing heavy so worker processes start fast.
"""
