"""Packaging: `models/`, `parallelisms/` and `kernels/` sit at the repository's top level (the
product's layout) and install as subpackages of `torchtitan_like`, never as top-level packages."""

from setuptools import find_packages, setup

SUBPACKAGE_DIRS = {"models": "torchtitan_like.models", "parallelisms": "torchtitan_like.parallelisms",
                   "kernels": "torchtitan_like.kernels"}

packages = find_packages(include=["torchtitan_like", "torchtitan_like.*"])
package_dir = {"torchtitan_like": "torchtitan_like"}
for folder, name in SUBPACKAGE_DIRS.items():
    package_dir[name] = folder
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir,
      package_data={"torchtitan_like.data": ["corpus/*.gz"]})
