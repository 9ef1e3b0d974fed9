"""Built-in methods: importing this package registers each one (one file per paper)."""

from memfit.methods import full, h2o, snapkv, streaming  # noqa: F401
