"""The volunteer side: data, base model and adapter, local trainer, evaluation, node.

Deliberately empty of imports: a download-only install imports this package
without torch or flwr.
"""
