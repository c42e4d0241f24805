"""``lazysnap convert``: rewrite an image's layers as eStargz or zstd:chunked, optionally with
the files a workload reads first at the front.

May import the shared top-level modules and the roots of ``fusefs`` and ``registry``; never
``store``, ``remote``, ``daemon`` or ``commands``.
"""
