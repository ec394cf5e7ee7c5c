"""esxi-anomaly: find C2 traffic whose port or IP is calculated from a DNS answer (T1568.003).

Stages, each a package or module: `ingest` (real logs -> canonical frames, see `schema`),
`features` (DNS join, DNS-to-port relationships, per-entity baselines, management plane),
`detect` (isolation forest, rules as data, ensemble, explanations), `train` and `bundle`
(per-environment fitting and integrity-checked model bundles), `batch` (chunked scoring),
`report` (CSV, Parquet, ECS JSON lines, HTML) and `synth` (a generated vSphere estate).
"""
__version__ = "0.1.0"
