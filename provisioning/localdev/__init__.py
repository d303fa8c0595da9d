"""Loopback stand-ins for outside services, used by `make run` and the tests.

Nothing here imports Django: these fakes run as their own processes or in a test's thread.
"""
