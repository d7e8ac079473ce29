"""The pyabouts benchmark: pyabouts against other IPAM plugins, called as a runtime calls them.

Run it with `bash bench/run.sh` or `.venv/bin/python -m bench.run_benchmark --help`. It reports
figures; it asserts nothing. Modules:

- `process`: spawn one program, time it, and read its peak RSS, under GNU time
  (`/usr/bin/time`), so the benchmark's own RSS does not leak into the plugin's figure;
- a private etcd on free loopback ports, for the run only (`deploy/local/etcd_server.py`);
- `kube`: a private kube-apiserver (deploy.local.controlplane) with pyabouts' CRDs and RBAC,
  and its request counters from `/metrics`;
- `contenders`: the plugins under test, and how each is called for a phase on a simulated node;
- `machine`: CPU, versions and load, recorded with every result;
- `measure`: start-up, sequential and concurrent phases -> figures (no printing);
- `results`: the figures as dataclasses, ratios between contenders, JSON;
- `report`: tables on the terminal, JSON files in the output directory;
- `plot`: a PNG of latency and throughput (matplotlib, Agg) beside the JSON;
- `run_benchmark`: the command line.
"""
