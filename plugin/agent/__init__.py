"""`pyabouts-agent`, the node agent: its socket server (`server`), the backend that gives
requests warm, coalescing transactions (`backend`), the datastore it serves with its own
credentials (`datastore`), and its metrics (`metrics`)."""
