module pyabouts.dev/shim

go 1.19
