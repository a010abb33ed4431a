"""fastlm benchmarks: one module per op family plus the report writer. Run `python -m benchmarks`."""
