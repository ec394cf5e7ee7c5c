"""Per-entity traffic baselines: how unusual is this connection *for this VM or host*.

`EntityBaseline` is a scikit-learn estimator fitted on an environment's history. Lookups are hashed
(`pandas.util.hash_pandas_object`) and vectorised; nothing loops per connection. New entities fall
back to their role, then to the whole population.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly.estimator import Estimator, check_fitted
from esxi_anomaly.features.columns import distinct
from esxi_anomaly.features.hashing import combine as _h, hash_column, in_sorted
from esxi_anomaly.features.stream_state import trailing_count

BASELINE_FEATURES = [
    "port_rarity", "port_never_seen", "dst_never_seen", "dstport_never_seen", "domain_never_seen",
    "port_prevalence", "dst_prevalence", "hour_rarity", "bytes_out_z", "duration_z", "conn_rate_z", "entity_known",
]
REQUIRED = ["entity", "role", "dst_ip", "dst_port", "proto", "domain", "ts", "bytes_out", "duration"]
RATE_WINDOW_S = 300.0  # connection rate: the source's connections in the trailing five minutes
_Z_STATS = {"b": "bytes_out_z", "d": "duration_z", "r": "conn_rate_z"}


def _counts(keys: np.ndarray) -> pd.Series:
    uniq, cnt = np.unique(keys, return_counts=True)
    return pd.Series(cnt.astype("float64"), index=uniq)


def _lookup(table: pd.Series, keys: np.ndarray) -> np.ndarray:
    idx = table.index.get_indexer(keys)
    out = np.zeros(len(keys))
    ok = idx >= 0
    out[ok] = table.to_numpy()[idx[ok]]
    return out


class EntityBaseline(Estimator):
    """Smoothed port rarity, novelty, prevalence, hour rarity and robust z-scores per entity.

    Input frames carry the columns in `REQUIRED` (`entity` = source name, `role` = its peer group,
    `domain` = registered domain of the name that resolved the destination, "" if none).
    `alpha` is the pseudo-count pulling an entity towards its role (and a role towards the population).
    """

    def __init__(self, alpha: float = 5.0):
        self.alpha = alpha

    def fit(self, X: pd.DataFrame, y=None):
        _check(X)
        ent, role, dst, domain = _hashed(X)
        port = X["dst_port"].to_numpy(dtype="int64")
        hour = _hour(X["ts"].to_numpy())
        self.entity_totals_ = _counts(_h(ent))
        self.role_totals_ = _counts(_h(role))
        self.population_total_ = float(len(X))
        self.entity_port_ = _counts(_h(ent, port))
        self.role_port_ = _counts(_h(role, port))
        self.population_port_ = _counts(port.astype("uint64"))
        self.entity_hour_ = _counts(_h(ent, hour))
        self.role_hour_ = _counts(_h(role, hour))
        self.seen_entity_dst_ = np.unique(_h(ent, dst))
        self.seen_entity_dstport_ = np.unique(_h(ent, dst, port))
        self.seen_entity_domain_ = np.unique(_h(ent, domain))
        self.seen_role_port_ = np.unique(_h(role, port))
        self.seen_role_dst_ = np.unique(_h(role, dst))
        self.seen_role_dstport_ = np.unique(_h(role, dst, port))
        self.seen_role_domain_ = np.unique(_h(role, domain))
        n_entities = max(len(self.entity_totals_), 1)
        pairs = pd.DataFrame({"e": _h(ent), "p": port, "d": _h(dst)})
        self.port_prevalence_ = pairs.drop_duplicates(["e", "p"]).groupby("p").size() / n_entities
        self.dst_prevalence_ = pairs.drop_duplicates(["e", "d"]).groupby("d").size() / n_entities
        # robust centre and scale of log bytes / duration / connection rate, per entity
        stats = _log_stats(X, ent)
        cols = list(_Z_STATS)
        med = stats.groupby("e")[cols].median()
        mad = (stats[cols] - med.loc[stats["e"]].to_numpy()).abs().groupby(stats["e"]).median()
        self.entity_median_ = med
        self.entity_mad_ = mad.clip(lower=0.25)  # floor: one-size traffic would give infinite z
        self.global_median_ = stats[cols].median()
        self.global_mad_ = (stats[cols] - self.global_median_).abs().median().clip(lower=0.25)
        ts = X["ts"].to_numpy(dtype="float64")
        self.history_days_ = float((ts.max() - ts.min()) / 86_400.0) if len(ts) else 0.0
        self.n_features_in_ = len(REQUIRED)
        return self

    def fit_transform(self, X: pd.DataFrame, y=None) -> pd.DataFrame:
        return self.fit(X, y).transform(X)

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        check_fitted(self, "entity_totals_")
        _check(X)
        ent, role, dst, domain = _hashed(X)
        port = X["dst_port"].to_numpy(dtype="int64")
        hour = _hour(X["ts"].to_numpy())
        # rows repeat (entity, destination, port, name, hour) heavily: look each combination up once
        codes, first = distinct(_h(ent, role, dst, port, domain, hour))
        keyed = self._keyed_features(ent[first], role[first], dst[first], port[first], domain[first], hour[first])
        out = {name: values[codes] for name, values in keyed.items()}
        stats = _log_stats(X, ent)
        ent_codes, ents = pd.factorize(stats["e"].to_numpy())
        med = self.entity_median_.reindex(ents)
        mad = self.entity_mad_.reindex(ents)
        for col, name in _Z_STATS.items():
            centre = med[col].fillna(self.global_median_[col]).to_numpy()[ent_codes]
            scale = mad[col].fillna(self.global_mad_[col]).to_numpy()[ent_codes]
            out[name] = np.clip((stats[col].to_numpy() - centre) / (1.4826 * scale), -50, 50)
        return pd.DataFrame({name: out[name] for name in BASELINE_FEATURES}, index=X.index, copy=False)

    def _keyed_features(self, ent, role, dst, port, domain, hour) -> dict[str, np.ndarray]:
        """Every feature that depends only on (entity, role, destination, port, domain, hour)."""
        a = self.alpha
        he, hr = _h(ent), _h(role)
        n_e = _lookup(self.entity_totals_, he)
        n_r = _lookup(self.role_totals_, hr)
        p_pop = (_lookup(self.population_port_, port.astype("uint64")) + a / 65_536) / (self.population_total_ + a)
        p_role = (_lookup(self.role_port_, _h(role, port)) + a * p_pop) / (n_r + a)
        p_ent = (_lookup(self.entity_port_, _h(ent, port)) + a * p_role) / (n_e + a)
        known = n_e > 0
        ph_role = (_lookup(self.role_hour_, _h(role, hour)) + a / 24) / (n_r + a)
        ph_ent = (_lookup(self.entity_hour_, _h(ent, hour)) + a * ph_role) / (n_e + a)

        def never(ent_table, role_table, *cols):
            # unknown entities are judged by what their role has seen
            return np.where(known, ~in_sorted(ent_table, _h(ent, *cols)), ~in_sorted(role_table, _h(role, *cols)))

        has_domain = domain != _EMPTY_KEY
        return {
            "port_rarity": -np.log(p_ent),
            "port_never_seen": np.where(known, _lookup(self.entity_port_, _h(ent, port)) == 0,
                                        ~in_sorted(self.seen_role_port_, _h(role, port))).astype("float64"),
            "dst_never_seen": never(self.seen_entity_dst_, self.seen_role_dst_, dst).astype("float64"),
            "dstport_never_seen": never(self.seen_entity_dstport_, self.seen_role_dstport_, dst, port).astype("float64"),
            "domain_never_seen": (has_domain & never(self.seen_entity_domain_, self.seen_role_domain_, domain)).astype("float64"),
            "port_prevalence": self.port_prevalence_.reindex(port).fillna(0.0).to_numpy(),
            "dst_prevalence": self.dst_prevalence_.reindex(_h(dst)).fillna(0.0).to_numpy(),
            "hour_rarity": -np.log(ph_ent),
            "entity_known": known.astype("float64"),
        }

    def get_feature_names_out(self, input_features=None):
        return np.array(BASELINE_FEATURES, dtype=object)


def _hashed(X: pd.DataFrame):
    """Column keys hashed once per call (entity, role, dst_ip, domain). Columns may hold strings or
    their `hashing.hash_column` keys (uint64), as `pipeline.prepare` passes them."""
    return tuple(hash_column(X[c]) for c in ("entity", "role", "dst_ip", "domain"))


_EMPTY_KEY = hash_column(np.array([""], dtype=object))[0]  # the key of "no domain"


def _log_stats(X: pd.DataFrame, ent: np.ndarray) -> pd.DataFrame:
    """Per row: entity key and log1p of bytes out, duration and connection rate. `conn_rate` (the
    source's connections in the trailing `RATE_WINDOW_S`, as `pipeline.prepare` counts it per source
    IP across batches) is counted here per entity when X lacks it."""
    he = _h(ent)
    rate = X["conn_rate"].to_numpy(dtype="float64") if "conn_rate" in X.columns else \
        trailing_count(he, X["ts"].to_numpy(dtype="float64"), RATE_WINDOW_S, None, "conn_rate").astype("float64")
    return pd.DataFrame({
        "e": he,
        "b": np.log1p(np.nan_to_num(X["bytes_out"].to_numpy(dtype="float64"), nan=0.0)),
        "d": np.log1p(np.nan_to_num(X["duration"].to_numpy(dtype="float64"), nan=0.0)),
        "r": np.log1p(rate),
    })


def _hour(ts: np.ndarray) -> np.ndarray:
    """Hour of day, exactly `(ts // 3600) % 24`; a division and a correction for the quotients that
    round up to the next integer cost less than float floor division."""
    ts = np.asarray(ts, dtype="float64")
    hours = np.floor(ts / 3600)
    hours -= hours * 3600 > ts
    return (hours % 24).astype("int64")


def _check(X: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED if c not in X.columns]
    if missing:
        raise ValueError(f"EntityBaseline needs columns {missing}")
