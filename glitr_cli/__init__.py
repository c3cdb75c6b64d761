"""glitr: GliTr (Glimpse Transformers, WACV 2023) for online action prediction from glimpses."""

__version__ = "0.1.0"
