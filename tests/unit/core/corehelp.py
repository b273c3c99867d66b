"""Constants shared by the core tests (importable: this directory is on sys.path under pytest)."""

SECRET = b"s" * 32
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z, a fixed fake clock
