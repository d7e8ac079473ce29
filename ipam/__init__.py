"""Pure allocation logic for pyabouts: configuration, ranges, the allocator and the store interface.

Nothing in this package talks to etcd, the Kubernetes API or the kernel, except the adapters in
`ipam.stores`, which are imported only by the code that needs them.
"""
