"""Stands in for `accelerate` in .ci/run's torch-free test run (PYTHONPATH=.ci/no-torch): importing it
fails exactly as if the package were not installed, so every test that needs the models extra has
to skip on its own and nothing else may import it."""

raise ModuleNotFoundError("No module named 'accelerate' (hidden by .ci/no-torch)", name="accelerate")
