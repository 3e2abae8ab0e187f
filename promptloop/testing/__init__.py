"""Builders of tiny random-weight models of the real architectures, for tests, benchmarks and the offline demo.

Nothing here downloads anything: tokenizers are built in code, models from configs.
"""
