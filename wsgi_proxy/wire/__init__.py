"""The wire protocol, free of Flask and of any I/O of its own: SSE framing, the relay, what the
proxy reads of requests (validation, query strings) and of answers (headers, Response objects)."""
