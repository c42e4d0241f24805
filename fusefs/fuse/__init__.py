"""The FUSE kernel protocol spoken by lazysnap itself: the wire structs (``abi``) and the
protocol server that serves an adopted connection (``server``)."""
