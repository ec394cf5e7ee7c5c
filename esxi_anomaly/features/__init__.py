"""Features: the DNS join, the transform library, DNS-to-port relationships, DNS-side features,
per-entity baselines, the ESXi management plane, and the pipeline that assembles the matrix."""
