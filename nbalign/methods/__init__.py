"""One module per training method; each maps its spec onto a TRL trainer over the shared run life in base."""
