"""Patch and subject embeddings of prepared or raw scans."""
