"""The evaluation loop: plan, verify, score, gather, write; batching, records, processes."""
