"""Readers of the offline Debian text corpora (Python docs, fortunes, SWORD Bibles) used by training and evaluation."""
