"""Benchmark evaluation (R1 paper protocol): pass@1 from k samples at temperature 0.6 / top-p 0.95,
cons@k majority vote, on AIME 2024, MATH-500, GSM8K and AMC 2023. `python -m r1mega.eval`."""
