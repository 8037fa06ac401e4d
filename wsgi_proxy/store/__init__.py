"""Shared state for multi-tenant routing: response locators, rate limits and stream slots."""

from .base import RateDecision as RateDecision
from .base import ResponseRecord as ResponseRecord
from .base import Store as Store
from .base import StoreError as StoreError
from .factory import open_store as open_store

__all__ = ["RateDecision", "ResponseRecord", "Store", "StoreError", "open_store"]
