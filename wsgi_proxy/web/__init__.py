"""The Flask layer: the Blueprint's thin views, the ``ResponsesProxy`` extension, the standalone app."""
