"""The compiled parts (`esxi_anomaly/compiled.py`): the forest's tree walk and the CSV row writer.
Optional: without a C compiler the package installs all the same and takes the pure paths (the same
results, slower)."""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("esxi_anomaly.detect._heap_walk", ["esxi_anomaly/detect/_heap_walk.c"], optional=True),
    Extension("esxi_anomaly.report._csv_rows", ["esxi_anomaly/report/_csv_rows.c"], optional=True),
])
