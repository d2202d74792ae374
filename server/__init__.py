"""vlmamba-serve: the HTTP server, the serving engine and the ``vlmamba`` command line."""
