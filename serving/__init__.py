"""What pyabouts' long-running processes (the node agent, the reconciler's controller) share
to serve: /metrics, /healthz and /readyz with bounded connections (`endpoints`), the --listen
address (`listen`), a bounded pool of worker threads (`workers`), and the pool-usage gauge."""
