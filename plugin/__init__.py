"""The CNI plugin: the protocol (env + stdin in, JSON out) around the `ipam` package."""
