"""Shared state for multi-tenant routing: response locators, rate limits, stream slots and token usage."""

from .base import KeyRecord as KeyRecord
from .base import RateDecision as RateDecision
from .base import ResponseRecord as ResponseRecord
from .base import Store as Store
from .base import StoreError as StoreError
from .base import UsageEntry as UsageEntry
from .base import UsageRow as UsageRow
from .factory import check_store as check_store
from .factory import open_store as open_store
from .null import NullStore as NullStore

__all__ = [
    "check_store",
    "KeyRecord",
    "NullStore",
    "RateDecision",
    "ResponseRecord",
    "Store",
    "StoreError",
    "UsageEntry",
    "UsageRow",
    "open_store",
]
