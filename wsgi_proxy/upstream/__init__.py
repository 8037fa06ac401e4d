"""The upstream client: the only code that speaks to upstreams, and the only code that touches
``requests``, ``urllib3`` and ``http.client`` (their exceptions are translated in ``translate.py``)."""
