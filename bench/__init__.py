"""fastgate's side-by-side benchmark suite: ``python -m bench --help`` (see bench/README.md).

Not part of the installed package; run from the repository root."""
