"""Plain-Flower FedAvg app: the baseline of bench/overhead_bench.py (stock Flower, no LoRA Commons code)."""
