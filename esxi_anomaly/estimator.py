"""The scikit-learn estimator API for the project's learnable pieces, without importing scikit-learn.

Importing `sklearn.base` costs about 1.2 s on a 2-core VM (it imports `scipy.stats`): more than half
of the 2 s a `score` of a small file may take. Scoring needs none of it: it loads a fitted model and
evaluates it. So `Estimator` provides what `sklearn.base.BaseEstimator` gives our estimators
(`get_params` / `set_params` from `__init__`'s signature, nested `a__b` parameters, a repr, the
tags `sklearn.utils.get_tags` asks for) and `check_fitted` raises scikit-learn's own
`NotFittedError`; scikit-learn is imported only by what needs it (fitting, `clone`, tags, errors).
`sklearn.base.clone`, `Pipeline` and pickling work on these classes as on sklearn's own.
"""
from __future__ import annotations

import inspect


class Estimator:
    """Params-only `__init__`; learned attributes end in `_` (as `sklearn.base.BaseEstimator`)."""

    @classmethod
    def _get_param_names(cls) -> list[str]:
        init = cls.__init__
        if init is object.__init__:
            return []
        params = [p for p in inspect.signature(init).parameters.values()
                  if p.name != "self" and p.kind != p.VAR_KEYWORD]
        if any(p.kind == p.VAR_POSITIONAL for p in params):
            raise RuntimeError(f"{cls.__name__}.__init__ takes *args: estimators name every parameter")
        return sorted(p.name for p in params)

    def get_params(self, deep: bool = True) -> dict:
        out = {}
        for key in self._get_param_names():
            value = getattr(self, key)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{key}__{k}", v) for k, v in value.get_params().items())
            out[key] = value
        return out

    def set_params(self, **params):
        if not params:
            return self
        valid = self.get_params(deep=True)
        nested: dict[str, dict] = {}
        for key, value in params.items():
            name, delim, sub = key.partition("__")
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for estimator {type(self).__name__}; "
                                 f"valid parameters are: {sorted(self._get_param_names())}")
            if delim:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
                valid[name] = value
        for name, sub_params in nested.items():
            valid[name].set_params(**sub_params)
        return self

    def __repr__(self) -> str:
        defaults = {name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()}
        shown = []
        for name in self._get_param_names():
            value = getattr(self, name, None)
            default = defaults.get(name, inspect.Parameter.empty)
            try:
                same = default is not inspect.Parameter.empty and bool(value == default)
            except (TypeError, ValueError):   # arrays and frames compare element-wise
                same = False
            if not same:
                shown.append(f"{name}={value!r}")
        text = f"{type(self).__name__}({', '.join(shown)})"
        return text if len(text) <= 700 else text[:650] + "...)"

    def __sklearn_tags__(self):
        from sklearn.utils import Tags, TargetTags, TransformerTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False),
                    transformer_tags=TransformerTags() if hasattr(self, "transform") else None)


def check_fitted(estimator, attribute: str) -> None:
    """scikit-learn's `NotFittedError` when `estimator` lacks the learned `attribute`."""
    if not hasattr(estimator, attribute):
        from sklearn.exceptions import NotFittedError

        raise NotFittedError(f"This {type(estimator).__name__} instance is not fitted yet. Call 'fit' with "
                             "appropriate arguments before using this estimator.")
