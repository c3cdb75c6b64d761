"""Data: official downloads and the toy generator to TSM frame folders, and the loader.

Stages, one module each: `formats` (label and list files), `prepare` and `folder` (PyAV decoding
into frame folders; `glitr prepare-data`), `toy` (the generated dataset), `dataset` (TSN sampling,
robust JPEG decoding), `transforms` (clip-consistent augmentation). Import the submodules directly;
this package imports nothing heavy so worker processes start fast.
"""
