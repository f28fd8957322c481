"""botd's runtime, the ground floor: config, messages, queue, inference worker, Redis stores.

Nothing in here imports from ``connectors`` or ``bots``.
"""
