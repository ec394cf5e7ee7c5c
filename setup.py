"""The one compiled part: the forest's tree walk (`detect.forest.HeapTrees`). Optional: without a C
compiler the package installs all the same and scores with scikit-learn's walk (the same numbers)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("esxi_anomaly.detect._heap_walk", ["esxi_anomaly/detect/_heap_walk.c"], optional=True)])
